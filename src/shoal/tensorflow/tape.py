"""``DistributedGradientTape`` and ``PartialDistributedGradientTape``: a ``tf.GradientTape`` whose
``gradient()`` returns gradients averaged across ranks, by the engine's step owner
(:class:`shoal.core.step.StepOwner`: buckets, fusion, compression, the per-step negotiation, the stall
inspector, join and the NaN check), exactly as ``shoal.keras``' optimizer does for ``model.fit``.

Design constraints:

1. One path into the engine. ``gradient()`` computes the local gradients with the user's tape, then hands
   them to a step owner in ONE host call (``tf.py_function`` inside ``tf.function``, a plain call eagerly:
   :func:`shoal.keras._bridge.run_on_host`), which marks each one ready, synchronizes, and hands back
   every source's reduced gradient (DLPack in and out, 64-byte aligned). One host call per step keeps the
   ranks' collectives in one order whatever order TF runs independent ops in.
2. Tapes are built anew every step (``tape = hvd.DistributedGradientTape(tape)`` inside the train step), so
   the step owners cannot live on the tape: they live in a registry keyed by the tape's settings and the
   sources' names, shapes and dtypes, one owner per set of sources (normally one per model; a GAN has
   two). Building one is collective (the registration check compares sources by position and the settings
   across ranks, so a difference is a named MismatchError, never a hang); it happens at the first
   ``gradient()`` of that set, on every rank alike.
3. The returned gradients are copies, not views into the engine's buckets: a custom loop may keep a
   step's gradients (to accumulate, to log) past the next step, which overwrites the buckets. Cost: one
   memcpy of the gradients per step (measured in benchmarks/tf_synthetic.py's numbers, which include it).
4. A source without a gradient on this rank (``None`` from TF) is not produced here: the negotiation gives
   it the other ranks' average (zeros from this rank), so ranks never diverge. Eagerly, a source no rank
   produced stays ``None`` and one that another rank produced gets that average. Inside ``tf.function``
   TF fixes which outputs are ``None`` when it traces, so a source that is ``None`` here stays ``None``;
   if another rank did produce it, applying the others' average on those ranks only would split the
   model silently, so this rank raises a ShoalError naming the source instead.
5. ``tf.IndexedSlices`` (embedding gradients) are reduced by the engine's sparse path (an allgather of
   indices and values, coalesced), and come back as ``tf.IndexedSlices``; ``sparse_as_dense=True``
   densifies them first and puts them in the buckets.
6. ``nan_check="skip"`` needs an update to skip, which a tape does not own (the user applies the
   gradients): it is refused, with a HINT; ``raise`` and ``warn`` behave as everywhere.
7. World size 1 (or op=Average with no scaling) costs nothing: the local gradients are returned as they are.
8. Elastic training changes the world under a traced step: a ``tf.function`` traced in a world of two
   keeps its host call when only one rank is left (the host then hands the local gradients back), and one
   traced in a world of one must still reduce when a worker joins, so in an elastic job every step goes
   through the host call (the cost of constraint 7's shortcut: one host call per step in a world of one).
   The step owner starts over in each new world (:mod:`shoal.core.step`, its constraint 6), buckets
   included, so whether this is the owner's first step is read after ``ready()``, which starts it over.
9. A peer lost during a traced step leaves the step half done: TensorFlow runs the ops that do not wait
   for the reduced gradients alongside the host call, Keras' ``optimizer.iterations.assign_add(1)`` among
   them (measured: 17 iterations after 16 steps kept across a SIGKILLed peer, tests/launcher/
   test_tf_elastic.py). So the failure is reported as a partial update and the survivors go back to the
   last commit (:func:`shoal.core.elastic.note_partial_update`). Eagerly the step stops at ``gradient()``,
   before the update: the survivors keep their work.

What lives elsewhere: the step's protocol (:mod:`shoal.core.step`), moving tensors (:mod:`shoal.keras._bridge`),
the user collectives (:mod:`shoal.tensorflow.collectives`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import tensorflow as tf
import torch

from shoal.core import runtime
from shoal.core.buckets import TensorSpec
from shoal.core.compression import Compression, resolve_compression
from shoal.core import elastic as _elastic
from shoal.core.errors import HorovodInternalError, MismatchError, ShoalError
from shoal.core.ops import ReduceOp, gradient_op
from shoal.core.step import StepOwner, resolve_settings
from shoal.keras import _bridge

__all__ = ["DistributedGradientTape", "PartialDistributedGradientTape", "tape_stats"]

log = logging.getLogger(__name__)

_TF = "tensorflow"

#: Trace-time Python, not graph code: AutoGraph calls it as it is (see shoal.tensorflow.collectives).
_host_code = tf.autograph.experimental.do_not_convert


def _source_key(source: Any) -> Any:
    """A hashable identity for a source (Horovod uses ``source.ref()``; keras Variables have no ``ref``)."""
    ref = getattr(source, "ref", None)
    return ref() if callable(ref) else ("id", id(source))


class DistributedGradientTape:
    """A tape whose :meth:`gradient` averages the gradients across ranks (Horovod's
    ``hvd.DistributedGradientTape``); everything else (``watch``, ``stop_recording``, ``jacobian``, ...)
    is the wrapped tape's.

    Args:
        gradtape: the ``tf.GradientTape`` that recorded the forward pass.
        device_dense, device_sparse: accepted for Horovod scripts; unused (the engine's device is used).
        compression: ``Compression.none`` / ``.fp16`` / ``.bf16`` / ``.mixed_fp16`` / ``.mixed_bf16``.
        sparse_as_dense: reduce ``tf.IndexedSlices`` gradients as dense tensors in the buckets.
        op: ``Average`` (default) or ``Sum``.
        gradient_predivide_factor: divide by this before the sum and by ``size / factor`` after (Average).
        num_groups: Horovod's deprecated spelling of an integer ``groups``.
        groups: an integer k (the sources split into k explicit buckets, in order) or a list of lists of
            variables (each list one bucket; the others as the engine plans them).
        process_set: the ranks to average over.
        scale_local_gradients: divide the gradients of sources registered as local by the set's size (as
            Horovod does, so that they keep their weight against the averaged ones).
        nan_check: ``raise`` / ``warn`` / ``off`` (default: the runtime config); ``skip`` is refused
            (constraint 6).
        **engine_options: ``fusion_threshold_mb``, ``first_bucket_mb``, ``num_streams``, ``hierarchical``,
            ``error_feedback``, ``negotiation``: override the runtime config for this tape.

    Raises:
        TypeError: ``gradtape`` is not a ``tf.GradientTape``; an unknown engine option.
        ValueError: an op other than Average/Sum, ``gradient_predivide_factor`` with Sum, bad ``groups``,
            ``nan_check="skip"``.

    Example:
        >>> with tf.GradientTape() as tape:
        ...     loss = loss_fn(y, model(x, training=True))
        >>> tape = hvd.DistributedGradientTape(tape)
        >>> grads = tape.gradient(loss, model.trainable_variables)
        >>> opt.apply_gradients(zip(grads, model.trainable_variables))
    """

    @_host_code
    def __init__(self, gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                 compression: Any = Compression.none, sparse_as_dense: bool = False, op: Any = ReduceOp.Average,
                 gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups: Any = None,
                 process_set: runtime.ProcessSet = runtime.global_process_set, scale_local_gradients: bool = True,
                 *, nan_check: Optional[str] = None, **engine_options: Any):
        if isinstance(gradtape, DistributedGradientTape):
            raise ValueError("shoal: this tape is already a DistributedGradientTape. HINT: wrap the "
                             "tf.GradientTape once.")
        if not isinstance(gradtape, tf.GradientTape):
            raise TypeError(f"shoal: DistributedGradientTape needs a tf.GradientTape, got "
                            f"{type(gradtape).__name__}. HINT: hvd.DistributedGradientTape(tape) after `with "
                            "tf.GradientTape() as tape:`.")
        op_name = gradient_op(op, "DistributedGradientTape")
        if gradient_predivide_factor != 1.0 and op_name != ReduceOp.Average:
            raise ValueError("shoal: gradient_predivide_factor needs op=Average (DistributedGradientTape)")
        if num_groups:
            if groups is None:
                groups = num_groups
        if groups is not None and not (isinstance(groups, (list, tuple)) or
                                       (isinstance(groups, int) and not isinstance(groups, bool) and groups > 0)):
            raise ValueError(f"shoal: groups must be a positive integer or a list of lists of variables, got "
                             f"{groups!r} (DistributedGradientTape)")
        self._tape = gradtape
        self._process_set = process_set
        self._scale_local = bool(scale_local_gradients)
        self._local_sources: dict[Any, Any] = {}
        self._groups = groups
        given = {**engine_options, "compression": resolve_compression(compression), "nan_check": nan_check}
        settings = resolve_settings(given, "DistributedGradientTape")
        if settings.nan_check == "skip":
            source = "nan_check='skip'" if nan_check else "the runtime config's nan_check=skip (SHOAL_NAN_CHECK)"
            raise ValueError(
                f"shoal: {source} skips the optimizer's update on every rank, but a DistributedGradientTape "
                "does not apply the gradients (your code does), so it cannot skip it. HINT: pass "
                "nan_check='raise' or 'warn' to the tape, or use shoal.keras' DistributedOptimizer, which owns "
                "the update.")
        fixed = frozenset(k for k, v in given.items() if v is not None)
        ps = runtime.get_process_set(process_set, "DistributedGradientTape")
        # The config is a mutable dataclass (not hashable): its repr lists every field.
        key = (op_name, float(gradient_predivide_factor), ps.ranks, bool(sparse_as_dense), repr(settings), fixed)
        self._exchange = _exchanges.get(key)
        if self._exchange is None:
            self._exchange = _exchanges[key] = _Exchange(
                ps, op=op_name, prescale=1.0 / gradient_predivide_factor, postscale=float(gradient_predivide_factor),
                sparse_as_dense=bool(sparse_as_dense), settings=settings, fixed=fixed)

    # -------------------------------------------------------------------------------- the tape's own surface
    def __enter__(self) -> "DistributedGradientTape":
        self._tape.__enter__()
        return self

    def __exit__(self, *exc) -> Any:
        return self._tape.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:  # watch, stop_recording, reset, jacobian, batch_jacobian, ...
        if name.startswith("__") or name == "_tape":
            raise AttributeError(name)
        return getattr(self._tape, name)

    def register_local_source(self, source: Any) -> None:
        """Mark ``source`` (a variable or watched tensor) as local to this rank: its gradient is not
        reduced (divided by the set's size when ``scale_local_gradients``), as in Horovod (model-parallel
        layers, whose variables differ across ranks)."""
        self._local_sources[_source_key(source)] = source

    @_host_code
    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE, use_generic_names: bool = False) -> Any:
        """The gradients of ``target`` with respect to ``sources``, averaged across ranks.

        Args:
            target, sources, output_gradients, unconnected_gradients: as ``tf.GradientTape.gradient``
                (``sources`` may be nested).
            use_generic_names: accepted for Horovod scripts; unused.

        Returns:
            The structure of ``sources`` with every (non-local) gradient reduced; ``tf.IndexedSlices``
            stay ``tf.IndexedSlices`` unless ``sparse_as_dense``.

        Raises:
            MismatchError: ranks' sources differ (count, shapes, dtypes), or their settings do (named, on
                every rank). RankFailureError / StallError: a rank died or stopped (named).
            ShoalError: inside ``tf.function``, a source with no gradient here has one on another rank
                (constraint 4); non-finite gradients under ``nan_check="raise"``.
        """
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients,
                                    unconnected_gradients=unconnected_gradients)
        flat_sources = tf.nest.flatten(sources)
        flat_grads = tf.nest.flatten(grads)
        out = list(flat_grads)
        chosen = [i for i, s in enumerate(flat_sources) if _source_key(s) not in self._local_sources]
        if chosen:
            reduced = self._exchange.reduce([flat_grads[i] for i in chosen], [flat_sources[i] for i in chosen],
                                            self._groups_for([flat_sources[i] for i in chosen]))
            for i, g in zip(chosen, reduced):
                out[i] = g
        if self._scale_local and len(chosen) < len(flat_sources):
            n = float(runtime.get_process_set(self._process_set).size())
            for i in set(range(len(flat_sources))) - set(chosen):
                g = out[i]
                if isinstance(g, tf.IndexedSlices):
                    out[i] = tf.IndexedSlices(g.values / tf.cast(n, g.values.dtype), g.indices, g.dense_shape)
                elif g is not None:
                    out[i] = g / tf.cast(n, g.dtype)
        return tf.nest.pack_sequence_as(sources, out)

    @_host_code
    def get_local_and_global_gradients(self, target: Any, sources: Sequence[Any], output_gradients: Any = None,
                                       use_generic_names: bool = False) -> tuple[list, list]:
        """Horovod's split: ``([(local source, gradient)], [(reduced source, gradient)])``."""
        grads = self.gradient(target, sources, output_gradients=output_gradients)
        local, reduced = [], []
        for s, g in zip(sources, grads):
            (local if _source_key(s) in self._local_sources else reduced).append((s, g))
        return local, reduced

    def _groups_for(self, sources: list) -> Optional[list[list[int]]]:
        """Horovod's ``groups`` as lists of indices into ``sources`` (the explicit buckets of the engine)."""
        groups = self._groups
        if groups is None:
            return None
        n = len(sources)
        if isinstance(groups, int):
            k = min(groups, n)
            size = math.ceil(n / k)
            return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        where = {_source_key(s): i for i, s in enumerate(sources)}
        out = []
        for group in groups:
            idx = [where[_source_key(v)] for v in group if _source_key(v) in where]
            if idx:
                out.append(idx)
        return out


@_host_code
def PartialDistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                                   compression: Any = Compression.none, sparse_as_dense: bool = False,
                                   op: Any = ReduceOp.Average, gradient_predivide_factor: float = 1.0,
                                   num_groups: int = 0, groups: Any = None,
                                   process_set: runtime.ProcessSet = runtime.global_process_set,
                                   local_layers: Any = None, scale_local_gradients: bool = True,
                                   **kwargs: Any) -> DistributedGradientTape:
    """A :class:`DistributedGradientTape` that leaves the gradients of ``local_layers``' trainable weights
    local (Horovod's ``hvd.PartialDistributedGradientTape``).

    Args:
        local_layers: a Keras layer or a list of them (model-parallel parts that differ across ranks).
        The rest: as :class:`DistributedGradientTape`.

    Raises:
        ValueError: ``local_layers`` holds something that is not a Keras layer.

    Example:
        >>> tape = hvd.PartialDistributedGradientTape(tape, local_layers=[model.layers[0]])
    """
    keras = _bridge.import_keras()
    layer_types = (keras.layers.Layer,) + ((tf.keras.layers.Layer,) if hasattr(tf, "keras") else ())
    if local_layers is None:
        local_layers = []
    elif isinstance(local_layers, layer_types):
        local_layers = [local_layers]
    elif not all(isinstance(layer, layer_types) for layer in local_layers):
        raise ValueError("shoal: every entry of local_layers must be a Keras layer "
                         "(PartialDistributedGradientTape)")
    tape = DistributedGradientTape(gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
                                   gradient_predivide_factor, num_groups, groups, process_set,
                                   scale_local_gradients, **kwargs)
    for layer in local_layers:
        for var in layer.trainable_weights:
            tape.register_local_source(var)
    return tape


def tape_stats() -> dict[str, int]:
    """Counters over every DistributedGradientTape of this process.

    Returns:
        ``reductions``: ``gradient()`` calls whose gradients were reduced; ``owners``: step owners built
        (one per set of sources and settings); ``sparse``: IndexedSlices gradients reduced sparse.

    Example:
        >>> hvd.tape_stats()["owners"]
        1
    """
    return {"reductions": sum(e.reductions for e in _exchanges.values()),
            "owners": sum(len(e.owners) for e in _exchanges.values()),
            "sparse": sum(e.sparse for e in _exchanges.values())}


# ------------------------------------------------------------------------------------------------ the exchange

#: Constraint 2: one exchange per tape settings, one step owner per set of sources inside it.
_exchanges: dict[tuple, "_Exchange"] = {}


def _source_name(source: Any, i: int) -> str:
    """The name in messages: a variable's path (Keras 3) or name, else the source's position."""
    if isinstance(source, tf.Variable) or hasattr(source, "path"):
        name = getattr(source, "path", None) or getattr(source, "name", None)
        if name:
            return name[:-2] if name.endswith(":0") else name
    return f"source {i}"


class _Exchange:
    """The step owners of one tape setting (constraint 2) and the host call of a step."""

    def __init__(self, process_set: runtime.ProcessSet, *, op: ReduceOp, prescale: float, postscale: float,
                 sparse_as_dense: bool, settings, fixed: frozenset):
        self.process_set = process_set
        self.op, self.prescale, self.postscale = op, prescale, postscale
        self.sparse_as_dense = sparse_as_dense
        self.settings = settings
        self.fixed = fixed
        # In an elastic job the world may grow or shrink after a step is traced (constraint 8).
        self.active = runtime.elastic() or (process_set.included() and (
            process_set.size() > 1 or op == ReduceOp.Sum or prescale * postscale != 1.0))
        self.owners: dict[tuple, StepOwner] = {}
        self.reductions = 0
        self.sparse = 0

    def reduce(self, grads: list, sources: list, groups: Optional[list[list[int]]]) -> list:
        if not self.active:
            return grads
        specs = []
        for i, s in enumerate(sources):
            shape = tuple(s.shape.as_list()) if isinstance(s.shape, tf.TensorShape) else tuple(s.shape)
            if any(d is None for d in shape):
                raise ShoalError(f"shoal: source {i} of DistributedGradientTape.gradient() has the shape {shape}, "
                                 "not fully known, and the engine's buckets need every shape when they are "
                                 "planned. HINT: give the tf.function an input_signature with static shapes, or "
                                 "differentiate with respect to variables.")
            specs.append((_source_name(s, i), shape, tf.as_dtype(s.dtype).name))
        seen: dict[str, int] = {}
        for i, (name, shape, dtype) in enumerate(specs):  # the engine wants unique names: 'Variable', 'Variable#1'
            k = seen.get(name, 0)
            seen[name] = k + 1
            if k:
                specs[i] = (f"{name}#{k}", shape, dtype)
        key = (tuple(specs), None if groups is None else tuple(map(tuple, groups)))
        eager = tf.executing_eagerly()
        dense, sparse, ins = [], [], []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices) and self.sparse_as_dense:
                g = tf.convert_to_tensor(g)
            if isinstance(g, tf.IndexedSlices):
                sparse.append(i)
                ins += [_cast(g.values, specs[i][2]), tf.cast(g.indices, tf.int64)]
            else:
                dense.append(i)
                ins.append(_cast(g, specs[i][2]))
        absent = [i for i, g in enumerate(grads) if g is None]
        layout: list[tuple[int, str]] = []  # (source index, "dense" | "sparse"), filled by the host eagerly
        out_specs: list = []
        if not eager:
            for i in sorted(dense + sparse):
                if i in dense:
                    layout.append((i, "dense"))
                    out_specs.append((specs[i][1], specs[i][2]))
                else:
                    layout.append((i, "sparse"))
                    out_specs += [((None,) + specs[i][1][1:], specs[i][2]), ((None,), "int64")]

        def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return self._host(key, specs, groups, dense, sparse, absent, ts, layout, eager)

        outs = _bridge.run_on_host(host, ins, out_specs, _TF, what="DistributedGradientTape gradient allreduce")
        result: list = [None] * len(grads)
        k = 0
        for i, kind in layout:
            if kind == "dense":
                result[i] = outs[k]
                k += 1
            else:
                values, indices = outs[k], outs[k + 1]
                result[i] = tf.IndexedSlices(values, indices, dense_shape=tf.constant(specs[i][1], tf.int64))
                k += 2
        return result

    def _owner(self, key, specs, groups) -> StepOwner:
        owner = self.owners.get(key)
        if owner is None:
            device = runtime.device()
            try:
                owner = StepOwner(
                    [TensorSpec(n, shape, getattr(torch, dtype), device) for n, shape, dtype in specs],
                    settings=self.settings, process_set=self.process_set, op=self.op, prescale=self.prescale,
                    postscale=self.postscale, groups=groups, sparse_as_dense=self.sparse_as_dense,
                    fixed=self.fixed, what="shoal.tensorflow DistributedGradientTape",
                    registered_as=[f"source {i}" for i in range(len(specs))])
            except MismatchError as exc:
                here = "; ".join(f"source {i}: '{n}'" for i, (n, _, _) in list(enumerate(specs))[:4])
                raise MismatchError(
                    f"{exc} TensorFlow: sources are compared by position in tape.gradient(target, sources) "
                    "(layer names may differ across processes), with the tape's settings (compression, op, "
                    f"groups, sparse_as_dense, nan_check); on rank {runtime.rank()}: {here}"
                    + (" ..." if len(specs) > 4 else "") + ".", culprit_ranks=exc.culprit_ranks) from None
            self.owners[key] = owner
        return owner

    def _host(self, key, specs, groups, dense: list[int], sparse: list[int], absent: list[int],
              ts: list[torch.Tensor], layout: list, eager: bool) -> list[torch.Tensor]:
        """One step of the step owner (constraint 1): mark, synchronize, hand back copies (constraint 3)."""
        owner = self._owner(key, specs, groups)
        given_dense: dict[int, torch.Tensor] = {}
        given_sparse: dict[int, torch.Tensor] = {}
        pos = 0
        for i in sorted(dense + sparse):
            shape = specs[i][1]
            if i in dense:
                given_dense[i] = ts[pos].reshape(shape)
                pos += 1
            else:
                values, indices = ts[pos], ts[pos + 1]
                given_sparse[i] = torch.sparse_coo_tensor(indices.reshape(1, -1), values, shape, check_invariants=True)
                pos += 2
        first = False  # set after ready(): that is where a new world (elastic training) drops the old buckets

        def local(i: int) -> Optional[torch.Tensor]:
            if i in given_sparse:
                return given_sparse[i]
            if i in given_dense:
                return given_dense[i] if first else None  # later steps: loaded by ready() already
            if owner.built and owner.view(i) is None:
                # A sparse source with nothing here: an empty slice of the right shape (the engine's own
                # placeholder has as many sparse dims as the tensor has dims; TF's slices have one).
                shape = specs[i][1]
                dtype = getattr(torch, specs[i][2])
                return torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.long),
                                               torch.empty((0,) + tuple(shape[1:]), dtype=dtype), shape)
            return None

        with torch.no_grad():
            # Reverse order: roughly backward order, the engine's default bucket plan for step 1.
            for i in sorted(given_dense, reverse=True):
                owner.ready(i, given_dense[i])
            for i in given_sparse:
                owner.ready(i, None)
            first = not owner.built
            try:
                result = owner.synchronize(local)
            except HorovodInternalError:
                if not eager:  # constraint 9
                    _elastic.note_partial_update()
                raise
            owner.close()
            if owner.negotiator is None:  # nothing to reduce in this world (constraint 8)
                return _as_given(ts, specs, dense, sparse, layout, eager)
            self.reductions += 1
            self.sparse += len(result.sparse)
            result.apply_nan_policy()  # raise / warn, the same verdict on every rank (skip refused)
            none_have = set(result.none_have)
            if not eager:
                lost = [i for i in absent if i not in none_have]
                if lost:
                    names = ", ".join(f"'{specs[i][0]}'" for i in lost[:4]) + (" ..." if len(lost) > 4 else "")
                    raise ShoalError(
                        f"shoal: inside tf.function, {names} had no gradient on rank {runtime.rank()} (TF traced "
                        "it as None) but had one on another rank: applying it on those ranks only would make "
                        "the models differ. HINT: use the same variables on every rank (tf.cond keeps both "
                        "branches' gradients), register model-parallel variables with "
                        "tape.register_local_source(var), or run the step eagerly.")
            outs: list[torch.Tensor] = []
            order = [i for i, _ in layout] if not eager else range(len(specs))
            for i in order:
                if i in result.sparse or i in given_sparse:
                    s = result.sparse.get(i)
                    if s is None:
                        continue
                    if eager:
                        layout.append((i, "sparse"))
                    outs += [s.values().contiguous(), s.indices()[0].contiguous()]
                elif i in given_dense or (eager and i not in none_have):
                    if eager:
                        layout.append((i, "dense"))
                    view = owner.view(i)
                    outs.append(view.reshape(specs[i][1]).clone())
        return outs


def _as_given(ts: list[torch.Tensor], specs, dense: list[int], sparse: list[int], layout: list,
              eager: bool) -> list[torch.Tensor]:
    """The local gradients, as copies, in the host call's output order: a world with nothing to reduce."""
    outs: list[torch.Tensor] = []
    pos = 0
    for i in sorted(dense + sparse):
        if eager:
            layout.append((i, "dense" if i in dense else "sparse"))
        if i in dense:
            outs.append(ts[pos].reshape(specs[i][1]).clone())
            pos += 1
        else:
            outs += [ts[pos].clone(), ts[pos + 1].clone()]
            pos += 2
    return outs


def _cast(t: tf.Tensor, dtype: str) -> tf.Tensor:
    return t if t.dtype.name == dtype else tf.cast(t, dtype)
