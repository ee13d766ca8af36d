"""Horovod's collectives on Keras backend tensors: ``allreduce``, ``allgather``, ``broadcast``,
``broadcast_variables``.

Each converts to torch (DLPack, :mod:`shoal.keras._bridge`), calls :mod:`shoal.core.collectives` (one
code path per collective, with its cross-rank signature check) and converts back. Inside a compiled
function the call goes through the bridge's host call (``tf.py_function``, ``io_callback``), so these work
in ``tf.function`` and ``jax.jit`` too, except ``allgather`` under ``jax.jit`` (its output shape depends on
the other ranks, and JAX needs it at trace time).

Arguments: Python numbers, lists, tuples and numpy arrays become backend tensors first (Horovod's Keras
functions take whatever ``tf.constant`` takes); a value that is not a tensor and cannot become one goes to
the core as it is, which refuses it after its exchange, so that a bad value on one rank fails every rank
at once (constraint 3 of :mod:`shoal.core.collectives`). No exchange here carries objects: only tensors,
through the core.

16-bit integers and the unsigned 16/32/64-bit ones (TensorFlow and JAX have them): the core's signature has no
code for the unsigned ones, and gloo no kernel for 16-bit integers ("Invalid scalar type", torch 2.13). The
collectives that do no arithmetic (allgather, broadcast; ``shoal.tensorflow``'s alltoall) carry them as bytes,
one more trailing dimension of ``element_size`` uint8, bit for bit (``_as_bytes`` / ``_from_bytes``); their
allreduce still fails, with the core's error. A workaround here until the core widens them on the wire.

The host side of each collective takes the backend by argument (``_allreduce_on``, ``_allgather_on``,
``_broadcast_on``, ``_broadcast_values``): :mod:`shoal.tensorflow` calls the same functions with
``"tensorflow"`` whatever ``KERAS_BACKEND`` says, so both frontends run one code path per collective.

What lives elsewhere: the collectives themselves (:mod:`shoal.core.collectives`), gradient averaging
(:mod:`shoal.keras.optimizer`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from shoal.core import collectives as _coll
from shoal.core import runtime
from shoal.core.errors import ShoalError

from . import _bridge

__all__ = ["allreduce", "allgather", "broadcast", "broadcast_variables"]


#: Dtypes that travel as bytes in the collectives that do no arithmetic (see the module docstring).
_AS_BYTES = (torch.int16, torch.uint16, torch.uint32, torch.uint64)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``_AS_BYTES`` as uint8 with one more trailing dimension (a view); others as they are."""
    if t.dtype not in _AS_BYTES:
        return t
    return t.contiguous().reshape(*t.shape, 1).view(torch.uint8)


def _from_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`_as_bytes` for a tensor that was ``dtype``."""
    if dtype not in _AS_BYTES:
        return t
    return t.contiguous().view(dtype).reshape(t.shape[:-1])


def _value(x: Any) -> Any:
    """A keras.Variable's backend value; anything else as it is."""
    if isinstance(x, _bridge.import_keras().Variable):
        return x.value
    return x


def _spec(x: Any) -> tuple[tuple[Optional[int], ...], str]:
    """``(shape, dtype name)`` of a backend tensor; a dimension unknown while tracing (TF) is None."""
    keras = _bridge.import_keras()
    return tuple(None if d is None else int(d) for d in x.shape), keras.backend.standardize_dtype(x.dtype)


def _backend_tensor(value: Any) -> Optional[Any]:
    """``value`` as a backend tensor; None when it is not one and cannot become one (a dict, a string, a
    ragged list): the caller then hands it to the core, which raises on every rank (constraint 3 there)."""
    keras = _bridge.import_keras()
    x = _value(value)
    if isinstance(x, (bool, int, float, list, tuple, np.ndarray, np.generic)):
        try:
            x = keras.ops.convert_to_tensor(x)
        except (TypeError, ValueError):  # ragged or mixed lists: TF says ValueError, JAX/numpy TypeError
            return None
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else None


def allreduce(value: Any, name: Optional[str] = None, op: Any = None, average: Optional[bool] = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """Reduce a backend tensor (or a keras.Variable's value) across ranks; returns a new backend tensor.

    Args:
        value: a TF / JAX / torch tensor, numpy array, Python number or (nested) list, or ``keras.Variable``;
            same shape and dtype everywhere.
        op: ``Average`` (default), ``Sum``, ``Min``, ``Max``, ``Product`` (or torch.distributed's ops).
        average: Horovod's deprecated spelling of ``op`` (True = Average, False = Sum).

    Example:
        >>> mean_loss = hvd.allreduce(loss, name="loss")
    """
    keras = _bridge.import_keras()
    x = _backend_tensor(value)
    if x is None:
        return _coll.allreduce(value, average=average, name=name, op=op, prescale_factor=prescale_factor,
                               postscale_factor=postscale_factor, process_set=process_set)
    return _allreduce_on(keras.backend.backend(), x, name=name, op=op, average=average,
                         prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                         process_set=process_set)


def _allreduce_on(backend: str, x: Any, *, name: Optional[str] = None, op: Any = None,
                  average: Optional[bool] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                  process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """:func:`allreduce` of the ``backend`` tensor ``x`` (eager or symbolic), through the host call."""

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_coll.allreduce(ts[0].to(runtime.device()), average=average, name=name, op=op,
                                prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                                process_set=process_set).to(ts[0].device)]

    return _bridge.run_on_host(host, [x], [_spec(x)], backend, what="allreduce")[0]


def allgather(value: Any, name: Optional[str] = None,
              process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """Concatenate every rank's tensor along the first dimension (which may differ across ranks).

    Raises:
        ShoalError: called under ``jax.jit`` (the output shape is not known at trace time).

    Example:
        >>> all_preds = hvd.allgather(preds)
    """
    keras = _bridge.import_keras()
    backend = keras.backend.backend()
    x = _backend_tensor(value)
    if x is None:
        return _coll.allgather(value, name=name, process_set=process_set)
    if backend == "jax" and _bridge.is_symbolic(x):
        raise ShoalError("shoal: allgather inside jax.jit: its first dimension depends on the other ranks, "
                         "and JAX needs output shapes at trace time. HINT: call it outside jit (e.g. in a "
                         "callback), or allreduce a fixed-size tensor instead.")
    return _allgather_on(backend, x, name=name, process_set=process_set)


def _allgather_on(backend: str, x: Any, *, name: Optional[str] = None,
                  process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """:func:`allgather` of the ``backend`` tensor ``x`` (eager, or symbolic in TF), through the host call."""
    shape, dtype = _spec(x)

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        t = ts[0]
        out = _coll.allgather(_as_bytes(t).to(runtime.device()), name=name, process_set=process_set)
        return [_from_bytes(out.to(t.device), t.dtype)]

    return _bridge.run_on_host(host, [x], [((None,) + shape[1:], dtype)], backend, what="allgather")[0]


def broadcast(value: Any, root_rank: int, name: Optional[str] = None,
              process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """``root_rank``'s tensor on every rank (a new backend tensor).

    Example:
        >>> w0 = hvd.broadcast(w, root_rank=0)
    """
    keras = _bridge.import_keras()
    x = _backend_tensor(value)
    if x is None:
        return _coll.broadcast(value, root_rank, name=name, process_set=process_set)
    return _broadcast_on(keras.backend.backend(), x, root_rank, name=name, process_set=process_set)


def _broadcast_on(backend: str, x: Any, root_rank: int, *, name: Optional[str] = None,
                  process_set: Optional[runtime.ProcessSet] = None) -> Any:
    """:func:`broadcast` of the ``backend`` tensor ``x`` (eager or symbolic), through the host call."""

    def host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        t = ts[0]
        out = _coll.broadcast(_as_bytes(t).to(runtime.device()), root_rank, name=name, process_set=process_set)
        return [_from_bytes(out.to(t.device), t.dtype)]

    return _bridge.run_on_host(host, [x], [_spec(x)], backend, what="broadcast")[0]


def broadcast_variables(variables: Sequence[Any], root_rank: int = 0,
                        process_set: Optional[runtime.ProcessSet] = None) -> None:
    """Overwrite ``variables`` (keras.Variables) with ``root_rank``'s values, in one collective.

    The values travel as raw bytes in one flat buffer (a broadcast does no arithmetic, so one buffer
    serves every dtype); eager only (call it outside compiled code, e.g. in a callback).

    Example:
        >>> hvd.broadcast_variables(model.weights + model.optimizer.variables, root_rank=0)
    """
    keras = _bridge.import_keras()
    variables = [v for v in variables if v is not None]
    if not variables:
        return
    # np.ascontiguousarray would turn 0-d values (the iteration counter) into shape (1,)
    arrays = [np.asarray(keras.ops.convert_to_numpy(v), order="C") for v in variables]
    raw = _broadcast_values([torch.from_numpy(a.reshape(-1).view(np.uint8)) for a in arrays], root_rank,
                            process_set=process_set)
    for v, a, t in zip(variables, arrays, raw):
        v.assign(t.numpy().view(a.dtype).reshape(a.shape))


def _broadcast_values(values: Sequence[torch.Tensor], root_rank: int, *,
                      process_set: Optional[runtime.ProcessSet] = None) -> list[torch.Tensor]:
    """``root_rank``'s ``values`` on every rank, in ONE collective: the tensors travel as raw bytes in one
    flat buffer (a broadcast does no arithmetic, so one buffer serves every dtype). Returns new CPU tensors
    of the same shapes and dtypes (host side of :func:`broadcast_variables` and of
    ``shoal.tensorflow.broadcast_variables``)."""
    values = [t.detach().contiguous().cpu() for t in values]
    chunks = [t.reshape(-1).view(torch.uint8) for t in values]
    flat = torch.cat(chunks).to(runtime.device()) if chunks else torch.empty(0, dtype=torch.uint8)
    _coll.broadcast_(flat, root_rank, name=f"broadcast_variables.{len(values)}", process_set=process_set)
    flat = flat.cpu()
    out, offset = [], 0
    for t in values:
        n = t.numel() * t.element_size()
        # A copy per value: torch views bytes as a wider dtype only from an aligned offset.
        out.append(flat[offset:offset + n].clone().view(t.dtype).reshape(t.shape))
        offset += n
    return out
