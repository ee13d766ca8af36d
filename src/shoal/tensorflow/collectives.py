"""Horovod's collectives on TensorFlow tensors (``horovod.tensorflow``'s ``allreduce``, ``grouped_allreduce``,
``allgather``, ``grouped_allgather``, ``broadcast``, ``broadcast_``, ``alltoall``, ``reducescatter``,
``grouped_reducescatter``, ``broadcast_variables``), eager and inside ``tf.function`` (or a TF1 graph run by a
session), with Horovod's gradients.

Each collective moves its tensors to torch (DLPack) and calls :mod:`shoal.core.collectives`, through the host
call of :mod:`shoal.keras._bridge` (``tf.py_function`` when tracing): the same code path, signature check and
error messages as ``shoal.torch`` and ``shoal.keras``. allreduce, allgather and broadcast are the host sides of
:mod:`shoal.keras.collectives` (``_allreduce_on`` and friends) with the backend fixed to ``"tensorflow"``, so
they work whatever ``KERAS_BACKEND`` says.

Design constraints:

1. Gradients as Horovod defines them (``horovod/tensorflow/mpi_ops.py``), so that models built on these ops
   train to the same numbers: allreduce -> allreduce of the gradient with the same op and factors;
   allgather -> the gradient averaged over the set, then this rank's rows; broadcast -> averaged, zero off
   the root; alltoall -> alltoall back with the received splits; reducescatter -> allgather of the gradient
   (times the set size for ``Sum``, times the factors). They are ``tf.custom_gradient`` functions, one host
   call each way.
2. Inside a trace, the order in which ranks reach the host calls is the program's: ``tf.py_function`` is
   stateful, and ``tf.function``'s automatic control dependencies run stateful ops in program order. (A TF1
   graph has no such order: run one collective per ``session.run``, or chain them with control
   dependencies, as with Horovod's named ops.)
3. A value that is not a tensor and cannot become one (a dict, a string) goes to the core as it is, which
   refuses it after its exchange, so a bad value on one rank fails every rank at once (constraint 3 of
   :mod:`shoal.core.collectives`).
4. 16-bit and unsigned integers travel as bytes in the collectives that do no arithmetic (allgather,
   broadcast, alltoall), as :mod:`shoal.keras.collectives` explains (``_as_bytes``).

What lives elsewhere: gradient averaging for training (:mod:`shoal.tensorflow.tape`, through the engine's step
owner), the collectives themselves (:mod:`shoal.core.collectives`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf
import torch

from shoal.core import collectives as _coll
from shoal.core import runtime
from shoal.core.compression import Compression, Compressor
from shoal.core.ops import ReduceOp, resolve_op
from shoal.keras import _bridge
from shoal.keras import collectives as _kc

__all__ = ["allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast", "broadcast_",
           "alltoall", "reducescatter", "grouped_reducescatter", "broadcast_variables",
           "broadcast_global_variables", "rank_op", "size_op", "local_rank_op", "local_size_op",
           "process_set_included_op"]

_TF = "tensorflow"

#: Python that runs at trace time, not graph code: AutoGraph must call it as it is (it otherwise tries to
#: convert every function a tf.function calls, and warns when it cannot).
_host_code = tf.autograph.experimental.do_not_convert

def _as_tensor(value: Any) -> Optional[tf.Tensor]:
    """``value`` as a tf.Tensor (variables read, lists and numbers converted); None when it cannot be one
    (constraint 3)."""
    value = _kc._value(value)  # a keras.Variable's tf.Variable
    if isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_tensor(value):
        return tf.convert_to_tensor(value)
    if isinstance(value, (bool, int, float, list, tuple, np.ndarray, np.generic)):
        try:
            return tf.convert_to_tensor(value)
        except (TypeError, ValueError):
            return None
    return None


def _spec(x: tf.Tensor, ragged: bool = False) -> tuple[Optional[tuple], str]:
    """``(shape, dtype name)`` of a host call's output like ``x`` (None: unknown rank); ``ragged``: the
    first dimension depends on the other ranks."""
    if x.shape.rank is None:
        return None, x.dtype.name
    shape = tuple(x.shape.as_list())
    return ((None,) + shape[1:] if ragged and shape else shape), x.dtype.name


def _host(fn, tensors: Sequence[tf.Tensor], out_specs, what: str) -> list:
    """The bridge's host call, with TensorFlow as the backend (a None shape: unknown rank)."""
    return _bridge.run_on_host(fn, list(tensors), list(out_specs), _TF, what=what)


def _compressor(compression: Any) -> Optional[tf.DType]:
    """The TF wire dtype of Horovod's ``compression=`` on a user collective (None: as it is)."""
    if compression is None or compression is Compression.none:
        return None
    if not isinstance(compression, Compressor):
        raise TypeError(f"shoal: compression must be one of hvd.Compression.none / fp16 / bf16, got "
                        f"{compression!r}. HINT: pass hvd.Compression.fp16.")
    return None if compression.wire_dtype is None else tf.as_dtype(str(compression.wire_dtype).split(".")[-1])


# ------------------------------------------------------------------------------------------------ allreduce

@_host_code
def allreduce(tensor: Any, average: Optional[bool] = None, device_dense: str = "", device_sparse: str = "",
              compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, name: Optional[str] = None,
              process_set: runtime.ProcessSet = runtime.global_process_set,
              ignore_name_scope: bool = False) -> Any:
    """Reduce a tensor across ranks (Horovod's ``hvd.allreduce``); differentiable.

    Args:
        tensor: a ``tf.Tensor``, ``tf.Variable``, keras Variable, numpy array, Python number or list, or a
            ``tf.IndexedSlices`` (then: an allgather of values and indices, ``Sum`` or ``Average`` only, as
            in Horovod). The same shape and dtype on every rank.
        average: Horovod's deprecated spelling of ``op`` (True = Average, False = Sum).
        device_dense, device_sparse, ignore_name_scope: accepted for Horovod scripts; unused.
        compression: ``Compression.fp16`` / ``bf16``: floating tensors travel in 16 bits.
        op: ``Average`` (default), ``Sum``, ``Min``, ``Max``, ``Product``.
        prescale_factor / postscale_factor: multiply before / after the reduction.
        name: checked across ranks (not used for matching: ranks call collectives in the same order).
        process_set: the ranks to reduce over.

    Returns:
        A new tensor (or ``tf.IndexedSlices``) of the same shape and dtype.

    Raises:
        MismatchError: ranks passed different shapes, dtypes, ops or names (every rank raises; inside a
            ``tf.function`` TensorFlow reports it as an ``UnknownError`` carrying the same message).
        NotImplementedError: ``tf.IndexedSlices`` with an op other than Sum/Average, or with scale factors.

    Example:
        >>> mean_loss = hvd.allreduce(loss)
        >>> total = hvd.allreduce(tf.constant([1.0, 2.0]), op=hvd.Sum)
    """
    if isinstance(tensor, tf.IndexedSlices):
        return _allreduce_slices(tensor, average, op, prescale_factor, postscale_factor, process_set)
    x = _as_tensor(tensor)
    if x is None:
        return _coll.allreduce(tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
                               postscale_factor=postscale_factor, process_set=process_set)
    wire = _compressor(compression)
    dtype = x.dtype
    if wire is not None and dtype.is_floating and dtype != wire:
        x = tf.cast(x, wire)
    out = _allreduce_grad_fn(average, op, prescale_factor, postscale_factor, name, process_set)(x)
    return tf.cast(out, dtype) if out.dtype != dtype else out


def _allreduce_grad_fn(average, op, prescale_factor, postscale_factor, name, process_set):
    kwargs = dict(average=average, op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                  process_set=process_set)

    @tf.custom_gradient
    def reduce(x):
        y = _kc._allreduce_on(_TF, x, name=name, **kwargs)

        def grad(dy):
            _differentiable(op, average, "allreduce")
            return _kc._allreduce_on(_TF, _ones_if_none(dy, y), **kwargs)

        return y, grad

    return reduce


def _differentiable(op: Any, average: Optional[bool], what: str) -> None:
    resolved = resolve_op(op, average, what)
    if resolved not in (ReduceOp.Sum, ReduceOp.Average):
        raise NotImplementedError(f"shoal: the gradient of {what} with op={resolved.name} is not defined here "
                                  "(Horovod reduces the gradient with the same op, which is not its "
                                  "derivative). HINT: differentiate through Sum or Average.")


def _ones_if_none(dy, y):
    return tf.zeros_like(y) if dy is None else dy


def _allreduce_slices(tensor: tf.IndexedSlices, average, op, prescale_factor, postscale_factor, process_set):
    """Horovod's sparse allreduce: values and indices allgathered (not coalesced), divided for Average."""
    resolved = resolve_op(op, average, "allreduce")
    if resolved not in (ReduceOp.Sum, ReduceOp.Average):
        raise NotImplementedError(f"shoal: allreduce of tf.IndexedSlices supports Sum and Average only, got "
                                  f"{resolved.name}. HINT: convert it with tf.convert_to_tensor() first.")
    if prescale_factor != 1.0 or postscale_factor != 1.0:
        raise NotImplementedError("shoal: prescale_factor/postscale_factor are not supported with "
                                  "tf.IndexedSlices. HINT: scale the values yourself, or convert the slices "
                                  "with tf.convert_to_tensor() first.")
    values, indices = grouped_allgather([tensor.values, tensor.indices], process_set=process_set)
    if resolved == ReduceOp.Average:
        values = values / tf.cast(runtime.get_process_set(process_set).size(), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=tensor.dense_shape)


@_host_code
def grouped_allreduce(tensors: Sequence[Any], average: Optional[bool] = None, device_dense: str = "",
                      device_sparse: str = "", compression: Any = Compression.none, op: Any = None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                      process_set: runtime.ProcessSet = runtime.global_process_set, name: Optional[str] = None,
                      ignore_name_scope: bool = False) -> list:
    """Reduce several tensors in one collective (Horovod's ``hvd.grouped_allreduce``); differentiable.

    ``tf.IndexedSlices`` in the list are reduced as :func:`allreduce` does (allgathers), the dense tensors
    together in one host call and one core call. Arguments as :func:`allreduce`.

    Example:
        >>> a, b = hvd.grouped_allreduce([ta, tb], op=hvd.Sum)
    """
    tensors = list(tensors)
    out: list = [None] * len(tensors)
    dense = []
    for i, t in enumerate(tensors):
        if isinstance(t, tf.IndexedSlices):
            out[i] = _allreduce_slices(t, average, op, prescale_factor, postscale_factor, process_set)
        else:
            dense.append(i)
    xs = [_as_tensor(tensors[i]) for i in dense]
    if any(x is None for x in xs):  # constraint 3: the core refuses on every rank
        return _coll.grouped_allreduce([tensors[i] for i in dense], average=average, name=name, op=op,
                                       prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                                       process_set=process_set)
    wire = _compressor(compression)
    dtypes = [x.dtype for x in xs]
    xs = [tf.cast(x, wire) if wire is not None and x.dtype.is_floating and x.dtype != wire else x for x in xs]
    kwargs = dict(average=average, op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                  process_set=process_set)

    def host_fn(nm):
        def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            dev = runtime.device()
            outs = _coll.grouped_allreduce([t.to(dev) for t in ts], name=nm, **kwargs)
            return [o.to(t.device) for o, t in zip(outs, ts)]
        return host

    @tf.custom_gradient
    def reduce(*args):
        ys = _host(host_fn(name), args, [_spec(a) for a in args], "grouped_allreduce")

        def grad(*dys):
            _differentiable(op, average, "grouped_allreduce")
            dys = [_ones_if_none(d, y) for d, y in zip(dys, ys)]
            return _host(host_fn(None), dys, [_spec(d) for d in dys], "grouped_allreduce")

        return ys, grad

    if xs:
        ys = reduce(*xs)
        for i, y, dt in zip(dense, ys, dtypes):
            out[i] = tf.cast(y, dt) if y.dtype != dt else y
    return out


# ------------------------------------------------------------------------------------------------ allgather

@_host_code
def allgather(tensor: Any, name: Optional[str] = None, ignore_name_scope: bool = False,
              process_set: runtime.ProcessSet = runtime.global_process_set) -> Any:
    """Concatenate every rank's tensor along the first dimension, which may differ across ranks (Horovod's
    ``hvd.allgather``); differentiable (constraint 1).

    Example:
        >>> all_preds = hvd.allgather(preds)
    """
    return grouped_allgather([tensor], name=name, process_set=process_set)[0]


@_host_code
def grouped_allgather(tensors: Sequence[Any], name: Optional[str] = None, ignore_name_scope: bool = False,
                      process_set: runtime.ProcessSet = runtime.global_process_set) -> list:
    """:func:`allgather` of several tensors in one host call (Horovod's ``hvd.grouped_allgather``).

    Example:
        >>> xs, ys = hvd.grouped_allgather([x, y])
    """
    tensors = list(tensors)
    xs = [_as_tensor(t) for t in tensors]
    if any(x is None for x in xs):
        return _coll.grouped_allgather(tensors, name=name, process_set=process_set)

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        dev = runtime.device()
        outs = _coll.grouped_allgather([_kc._as_bytes(t).to(dev) for t in ts], name=name, process_set=process_set)
        return [_kc._from_bytes(o.to(t.device), t.dtype) for o, t in zip(outs, ts)]

    @tf.custom_gradient
    def gather(*args):
        if len(args) == 1:  # the shared host side of shoal.keras.allgather
            ys = [_kc._allgather_on(_TF, args[0], name=name, process_set=process_set)]
        else:
            ys = _host(host, args, [_spec(a, ragged=True) for a in args], "allgather")

        def grad(*dys):
            dys = [_ones_if_none(d, y) for d, y in zip(dys, ys)]
            # Horovod's gradient: averaged over the set (one allreduce per tensor: TF may hand back float32
            # zeros for a float64 output), then this rank's rows; every rank's first dimensions in one
            # allgather.
            avg = [allreduce(d, op=ReduceOp.Average, process_set=process_set) for d in dys]
            sizes = allgather(tf.stack([tf.shape(a, out_type=tf.int64)[0] for a in args])[None, :],
                              process_set=process_set)
            me = runtime.get_process_set(process_set).rank()
            return [_rows_of(d, sizes[:, k], me) for k, d in enumerate(avg)]

        return ys, grad

    return list(gather(*xs))


def _rows_of(t: tf.Tensor, sizes: tf.Tensor, me: int) -> tf.Tensor:
    """Rows ``sum(sizes[:me]) .. + sizes[me]`` of ``t`` (sizes known only at run time)."""
    sizes = tf.cast(sizes, tf.int64)
    start = tf.reduce_sum(sizes[:me])
    return t[start:start + sizes[me]]


# ------------------------------------------------------------------------------------------------ broadcast

@_host_code
def broadcast(tensor: Any, root_rank: int, name: Optional[str] = None, ignore_name_scope: bool = False,
              process_set: runtime.ProcessSet = runtime.global_process_set) -> Any:
    """``root_rank``'s tensor on every rank, as a new tensor (Horovod's ``hvd.broadcast``); differentiable
    (constraint 1).

    Example:
        >>> w0 = hvd.broadcast(w, root_rank=0)
    """
    x = _as_tensor(tensor)
    if x is None:
        return _coll.broadcast(tensor, root_rank, name=name, process_set=process_set)

    @tf.custom_gradient
    def bcast(a):
        y = _kc._broadcast_on(_TF, a, root_rank, name=name, process_set=process_set)

        def grad(dy):
            reduced = allreduce(_ones_if_none(dy, y), op=ReduceOp.Average, process_set=process_set)
            return reduced if runtime.rank() == root_rank else reduced * 0

        return y, grad

    return bcast(x)


def _read(v: Any) -> tf.Tensor:
    return tf.convert_to_tensor(_kc._value(v))


@_host_code
def broadcast_(variables: Sequence[Any], root_rank: int, name: Optional[str] = None,
               process_set: runtime.ProcessSet = runtime.global_process_set) -> list:
    """Overwrite ``variables`` with ``root_rank``'s values in place, in one collective; returns their new
    values (Horovod's ``hvd.broadcast_``).

    Example:
        >>> hvd.broadcast_([w, b], root_rank=0)
    """
    variables = [v for v in variables if v is not None]
    if not variables:
        return []
    values = _broadcast_values(variables, root_rank, process_set)
    out = []
    for v, new in zip(variables, values):
        assigned = v.assign(new)
        # In a graph, the value returned must depend on the assignment: reading it then runs the assign,
        # and the variable holds the root's value afterwards (as Horovod's in-place op guarantees).
        out.append(_read(v) if tf.executing_eagerly() else tf.identity(assigned))
    return out


def _broadcast_values(variables: Sequence[Any], root_rank: int, process_set) -> list:
    reads = [_read(v) for v in variables]

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return _kc._broadcast_values(ts, root_rank, process_set=process_set)

    return _host(host, reads, [_spec(r) for r in reads], "broadcast_variables")


@_host_code
def broadcast_variables(variables: Sequence[Any], root_rank: int,
                        process_set: runtime.ProcessSet = runtime.global_process_set, inplace: bool = False) -> Any:
    """Overwrite ``variables`` (``tf.Variable`` or keras Variables) with ``root_rank``'s values, in one
    collective whatever their number and dtypes; eager, inside ``tf.function`` (Horovod's examples call it
    there, on the first batch) and in a TF1 graph.

    Args:
        variables: the variables (``model.variables``, ``optimizer.variables``); None entries are skipped.
        root_rank: the rank whose values win.
        inplace: accepted for Horovod scripts; the variables are always assigned in place.

    Returns:
        In a graph: the op that assigns them (run it); eagerly: None.

    Example:
        >>> hvd.broadcast_variables(model.variables, root_rank=0)
    """
    variables = [v for v in variables if v is not None]
    if not variables:
        return None if tf.executing_eagerly() else tf.no_op()
    values = _broadcast_values(variables, root_rank, process_set)
    assigns = [v.assign(new) for v, new in zip(variables, values)]
    if tf.executing_eagerly():
        return None
    return tf.group(*[a for a in assigns if a is not None])


@_host_code
def broadcast_global_variables(root_rank: int) -> Any:
    """Broadcast every global variable of the TF1 graph from ``root_rank`` (Horovod's TF1 helper); returns
    the op to run.

    Raises:
        RuntimeError: in eager mode (TF2 has no global variables; Horovod raises the same).
    """
    if tf.executing_eagerly():
        raise RuntimeError("shoal: broadcast_global_variables() needs a TF1 graph (there are no global variables "
                           "in eager mode). HINT: hvd.broadcast_variables(model.variables, root_rank=0).")
    return broadcast_variables(tf.compat.v1.global_variables(), root_rank)


# ------------------------------------------------------------------------------------------------ alltoall

@_host_code
def alltoall(tensor: Any, splits: Any = None, name: Optional[str] = None, ignore_name_scope: bool = False,
             process_set: runtime.ProcessSet = runtime.global_process_set) -> Any:
    """Send ``splits[i]`` rows of ``tensor`` to the i-th member and receive what each member sends here
    (Horovod's ``hvd.alltoall``); differentiable (constraint 1).

    Returns:
        Without ``splits``: the received tensor (the first dimension divided evenly); with ``splits``:
        ``(received, received_splits)``.

    Example:
        >>> out, got = hvd.alltoall(x, splits=[1, 3])
    """
    x = _as_tensor(tensor)
    if x is None:
        return _coll.alltoall(tensor, splits, name=name, process_set=process_set)
    given = splits is not None
    s = tf.cast(tf.convert_to_tensor(splits), tf.int32) if given else None

    def host_fn(nm, with_splits):
        def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            t = ts[0]
            out, received = _coll.alltoall_async(_kc._as_bytes(t).to(runtime.device()),
                                                 ts[1].to(torch.int64).tolist() if with_splits else None,
                                                 name=nm, process_set=process_set).wait()
            return [_kc._from_bytes(out.to(t.device), t.dtype), received.to(torch.int32)]
        return host

    n = runtime.get_process_set(process_set).size()

    @tf.custom_gradient
    def exchange(a):
        ins = [a, s] if given else [a]
        y, received = _host(host_fn(name, given), ins, [_spec(a, ragged=True), ((n,), "int32")], "alltoall")

        def grad(dy, _received_grad=None):  # the received splits are integers: no gradient
            back, _ = alltoall(_ones_if_none(dy, y), splits=received, process_set=process_set)
            return back

        return (y, received), grad

    y, received = exchange(x)
    return (y, received) if given else y


# ------------------------------------------------------------------------------------------------ reducescatter

@_host_code
def reducescatter(tensor: Any, device_dense: str = "", compression: Any = Compression.none, op: Any = ReduceOp.Average,
                  name: Optional[str] = None, process_set: runtime.ProcessSet = runtime.global_process_set,
                  ignore_name_scope: bool = False, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> Any:
    """Reduce across ranks, then give each rank its share of the first dimension (the first ``dim0 %
    size`` ranks one row more) (Horovod's ``hvd.reducescatter``); differentiable (constraint 1).

    Example:
        >>> mine = hvd.reducescatter(grads, op=hvd.Sum)
    """
    return grouped_reducescatter([tensor], device_dense=device_dense, compression=compression, op=op, name=name,
                                 process_set=process_set, prescale_factor=prescale_factor,
                                 postscale_factor=postscale_factor)[0]


@_host_code
def grouped_reducescatter(tensors: Sequence[Any], device_dense: str = "", compression: Any = Compression.none,
                          op: Any = ReduceOp.Average, name: Optional[str] = None,
                          process_set: runtime.ProcessSet = runtime.global_process_set,
                          ignore_name_scope: bool = False, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
    """:func:`reducescatter` of several tensors in one host call (Horovod's ``hvd.grouped_reducescatter``).

    Example:
        >>> a, b = hvd.grouped_reducescatter([ta, tb])
    """
    tensors = list(tensors)
    xs = [_as_tensor(t) for t in tensors]
    if any(x is None for x in xs):
        return _coll.grouped_reducescatter(tensors, name=name, op=op, process_set=process_set,
                                           prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    wire = _compressor(compression)
    dtypes = [x.dtype for x in xs]
    xs = [tf.cast(x, wire) if wire is not None and x.dtype.is_floating and x.dtype != wire else x for x in xs]
    ps = runtime.get_process_set(process_set)
    n, me = ps.size(), (ps.rank() if ps.included() else 0)

    def out_spec(a):
        shape, dtype = _spec(a)
        if shape and shape[0] is not None:
            shape = (shape[0] // n + (1 if me < shape[0] % n else 0),) + shape[1:]
        elif shape:
            shape = (None,) + shape[1:]
        return shape, dtype

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        dev = runtime.device()
        kw = dict(name=name, op=op, process_set=process_set, prescale_factor=prescale_factor,
                  postscale_factor=postscale_factor)
        if len(ts) == 1:
            outs = [_coll.reducescatter(ts[0].to(dev), **kw)]
        else:
            outs = _coll.grouped_reducescatter([t.to(dev) for t in ts], **kw)
        return [o.to(t.device) for o, t in zip(outs, ts)]

    @tf.custom_gradient
    def scatter(*args):
        ys = _host(host, args, [out_spec(a) for a in args], "reducescatter")

        def grad(*dys):
            scale = float(prescale_factor * postscale_factor)
            if resolve_op(op, None, "reducescatter") == ReduceOp.Sum:
                scale *= n
            dys = [_ones_if_none(d, y) for d, y in zip(dys, ys)]
            dys = [d * tf.cast(scale, d.dtype) if scale != 1.0 else d for d in dys]
            return grouped_allgather(dys, process_set=process_set)

        return ys, grad

    ys = scatter(*xs)
    return [tf.cast(y, dt) if y.dtype != dt else y for y, dt in zip(ys, dtypes)]


# ------------------------------------------------------------------------------------------------ queries as ops

def rank_op(name: Optional[str] = None) -> tf.Tensor:
    """This process's rank as an int32 tensor (Horovod's ``hvd.rank_op``)."""
    return tf.constant(runtime.rank(), dtype=tf.int32)


def size_op(process_set_id: int = 0, name: Optional[str] = None) -> tf.Tensor:
    """The size of the world (or of the process set with this id) as an int32 tensor."""
    return tf.constant(_set_by_id(process_set_id).size(), dtype=tf.int32)


def local_rank_op(name: Optional[str] = None) -> tf.Tensor:
    """This process's rank on its node as an int32 tensor."""
    return tf.constant(runtime.local_rank(), dtype=tf.int32)


def local_size_op(name: Optional[str] = None) -> tf.Tensor:
    """The number of ranks on this node as an int32 tensor."""
    return tf.constant(runtime.local_size(), dtype=tf.int32)


def process_set_included_op(process_set_id: int = 0, name: Optional[str] = None) -> tf.Tensor:
    """1 when this rank belongs to the process set with this id, else 0 (an int32 tensor)."""
    return tf.constant(int(_set_by_id(process_set_id).included()), dtype=tf.int32)


def _set_by_id(process_set_id: int) -> runtime.ProcessSet:
    if int(process_set_id) != 0:
        raise ValueError(f"shoal: size_op/process_set_included_op take process_set_id=0 (the global set) here, "
                         f"got {process_set_id}. HINT: use process_set.size() / process_set.included() on the "
                         "hvd.ProcessSet object.")
    return runtime.get_process_set(None)
