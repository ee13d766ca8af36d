"""The bridge between Keras backend tensors and the engine's torch tensors.

This module owns three things, for the TensorFlow, JAX and PyTorch backends of Keras 3:

* importing Keras with a clear error when it, or the backend it was told to use, is missing;
* moving tensors to torch and back through DLPack (no copy on the CPU);
* running host code (the engine) from inside a compiled train step: ``tf.py_function`` inside
  ``tf.function``, ``jax.experimental.io_callback`` inside ``jax.jit``, a plain call for torch.

What lives elsewhere: what the host code does (the optimizer wrapper, :mod:`shoal.keras.optimizer`, and the
collectives, :mod:`shoal.keras.collectives`), the reduction itself (:mod:`shoal.core.reducer`).

Design constraints:

1. Zero copies across the boundary where the framework allows it. TF -> torch and JAX -> torch are
   ``torch.from_dlpack``; torch -> TF is ``tf.experimental.dlpack.from_dlpack``. The tensors handed back
   are views into the engine's bucket buffers, valid until the next reduction overwrites them (a train
   step consumes them before that).
2. TensorFlow accepts a DLPack buffer that is not 64-byte aligned and aborts the whole process at the first
   op that reads it (``Check failed: IsAligned()``, SIGABRT, no Python exception); measured with TF 2.21 on
   torch views 4 or 32 bytes off (float32 at element offset 1 or 8, bfloat16/float16 at 16, float64 at 4).
   The engine pads every bucket offset to 64 bytes whatever the dtype (``shoal.core.buckets.align_numel``)
   and torch's CPU allocator aligns buffers to 64 bytes, but a foreign allocator or a user's view may
   differ: every pointer is checked against ``ALIGN_BYTES`` (bytes, whatever
   the dtype), and a misaligned tensor is copied once into a fresh aligned one instead of crashing
   (tests/unit/test_keras_bridge.py, with the abort itself as the control).
3. One host call per train step, carrying every tensor of the step: ranks then issue their collectives in
   the same order whatever order the backend's scheduler runs independent ops in.
4. XLA cannot compile a host call in TensorFlow (``tf.py_function`` has no XLA kernel); JAX can
   (``io_callback``). A TF trace under ``jit_compile=True`` is detected while tracing and raises a
   :class:`~shoal.core.errors.ShoalError` with a HINT (the callbacks of :mod:`shoal.keras.callbacks` turn
   XLA off for the train step before the first trace, which is where Keras lets anyone do so).
5. JAX callbacks are ``ordered=True``: XLA may otherwise reorder, merge or drop an unordered callback whose
   result it can see through, and two ranks must make the same calls in the same order.
6. An exception raised by the engine in a host call comes out of the compiled step as the framework's own
   error (TensorFlow's ``UnknownError``, JAX's ``XlaRuntimeError``) with only its text: the bridge keeps
   the original (:func:`take_host_error`), so that elastic training (:mod:`shoal.keras.elastic`) still sees
   a lost peer as a :class:`~shoal.core.errors.HorovodInternalError`.
7. The same order in a TF1 graph (``tf.compat.v1``, run by a session; ``shoal.tensorflow`` supports it):
   inside ``tf.function`` the automatic control dependencies run stateful ops, ``tf.py_function``
   included, in program order, but a TF1 graph has none, and one ``session.run`` fetching several host
   calls ran them in a different order on each rank (measured with Horovod's "fused" tests: mismatch
   errors, or, for calls of one shape and dtype with generated names, values silently exchanged between
   them). So in a TF1 graph each host call gets a control dependency on the one created before it in that
   graph: program order again. The price: fetching a later call alone runs the earlier ones again, on
   every rank alike.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shoal.core import buckets as _buckets
from shoal.core import env as _env
from shoal.core.errors import ShoalError

__all__ = [
    "import_keras",
    "keras_backend",
    "to_torch",
    "from_torch",
    "to_numpy",
    "is_symbolic",
    "run_on_host",
    "take_host_error",
    "in_xla_trace",
    "in_tf_trace",
    "aligned",
    "ALIGN_BYTES",
    "SUPPORTED_BACKENDS",
]

log = logging.getLogger(__name__)

#: TensorFlow's minimum alignment for tensor buffers (EIGEN_MAX_ALIGN_BYTES), see constraint 2: the engine's
#: bucket planner pads views to the same unit.
ALIGN_BYTES = _buckets.ALIGN_BYTES
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
_EXTRA = {"tensorflow": "tensorflow", "jax": "jax", "torch": "keras"}


def import_keras():
    """Import and return ``keras``; raise ImportError with the install line when it or its backend is missing.

    Raises:
        ImportError: keras, or the backend named by ``KERAS_BACKEND``, is not installed.
        ShoalError: the backend is not one Shoal supports (numpy, openvino).
    """
    wanted = _env.get_env("KERAS_BACKEND") or "tensorflow"
    try:
        import keras  # noqa: PLC0415 (optional dependency)
    except ModuleNotFoundError as exc:
        # The top-level package names what to install: Keras' TF backend first imports tensorflow.python,
        # and a broken or half-removed install reports that submodule.
        missing = (exc.name or "keras").split(".")[0]
        extra = _EXTRA.get(wanted, "keras") if missing != "keras" else "keras"
        raise ImportError(
            f"shoal.keras needs Keras 3 and its backend; `import keras` failed: no module named {missing!r} "
            f"(KERAS_BACKEND={wanted}). HINT: pip install 'shoal[{extra}]', or set KERAS_BACKEND to an "
            "installed backend (tensorflow, jax or torch) before the first `import keras`.") from exc
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ShoalError(f"shoal.keras supports the tensorflow, jax and torch backends of Keras, not {name!r}. "
                         "HINT: set KERAS_BACKEND=tensorflow|jax|torch before the first `import keras`.")
    return keras


def keras_backend() -> str:
    """The running Keras backend: ``tensorflow``, ``jax`` or ``torch``."""
    return import_keras().backend.backend()


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its buffer starts on a 64-byte boundary (or it is empty), else a copy that does
    (constraint 2); the same shape, dtype and values either way.

    Example:
        >>> buf = torch.zeros(32)      # torch's CPU allocator: 64-byte aligned
        >>> view = buf[16:]             # 64 bytes in
        >>> aligned(view) is view, aligned(buf[1:]).data_ptr() % 64
        (True, 0)
    """
    if t.data_ptr() % ALIGN_BYTES == 0 or t.numel() == 0:
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if out.data_ptr() % ALIGN_BYTES:  # a caching allocator could hand back an odd block; pad by hand
        raw = torch.empty(t.numel() * t.element_size() + ALIGN_BYTES, dtype=torch.uint8, device=t.device)
        skip = (-raw.data_ptr()) % ALIGN_BYTES
        out = raw[skip:skip + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    return out.copy_(t)


def to_torch(x: Any) -> torch.Tensor:
    """A torch tensor sharing ``x``'s memory where DLPack allows (TF, JAX, numpy); Keras variables by value.

    Raises:
        ShoalError: ``x`` is symbolic (a TF graph tensor or a JAX tracer): only concrete values can move.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, import_keras().Variable):
        x = x.value
        if isinstance(x, torch.Tensor):
            return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if is_symbolic(x):
        raise ShoalError(f"shoal: cannot move a symbolic tensor ({type(x).__name__}) to torch outside a host "
                         "call. HINT: call this collective outside compiled code (e.g. in a callback), or "
                         "through shoal.keras.allreduce, which inserts the host call itself.")
    if type(x).__module__.startswith("tensorflow"):
        import tensorflow as tf  # noqa: PLC0415

        x = tf.convert_to_tensor(x)  # a tf.Variable: its current value (DLPack needs a tensor)
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    return torch.as_tensor(np.asarray(x))


def from_torch(t: torch.Tensor, backend: str) -> Any:
    """``t`` as a tensor of ``backend`` (TF and JAX: through DLPack, aligned first; torch: ``t``)."""
    if backend == "torch":
        return t
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(aligned(t.contiguous())))
    if backend == "jax":
        import jax.numpy as jnp  # noqa: PLC0415

        if t.device.type == "cpu":
            return jnp.asarray(to_numpy(t))
        import jax.dlpack  # noqa: PLC0415

        return jax.dlpack.from_dlpack(aligned(t.contiguous()))
    raise ShoalError(f"shoal: unsupported Keras backend {backend!r}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array (a view on the CPU); bfloat16 through ``ml_dtypes``, which JAX ships."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # noqa: PLC0415 (a JAX dependency)

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def is_symbolic(x: Any) -> bool:
    """True for values that exist only inside a trace: TF graph tensors, JAX tracers."""
    mod = type(x).__module__
    if mod.startswith("jax"):
        import jax  # noqa: PLC0415

        return isinstance(x, jax.core.Tracer)
    if mod.startswith("tensorflow"):
        import tensorflow as tf  # noqa: PLC0415

        # Graph tensors only: eager tensors and variables have concrete values.
        return tf.is_tensor(x) and not isinstance(x, tf.Variable) and not hasattr(x, "numpy")
    return False


def in_xla_trace() -> bool:
    """True while TensorFlow traces a function that XLA will compile (``jit_compile=True``)."""
    try:
        from tensorflow.python.framework import ops as tf_ops  # noqa: PLC0415
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415
    except ImportError:  # a TF without this private helper: the XLA compiler's own error will tell
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


def in_tf_trace(backend: str) -> bool:
    """True while TensorFlow traces a function (``fit``'s train step): a host call made now runs later,
    inside the traced step, alongside ops that do not wait for it."""
    if backend != "tensorflow":
        return False
    import tensorflow as tf  # noqa: PLC0415 (TensorFlow backend only)

    return not tf.executing_eagerly()


_HostFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]

#: The last exception raised by a host call, for take_host_error (constraint 6).
_host_error: list[BaseException] = []


def _note_host_error(exc: BaseException) -> None:
    _host_error[:] = [exc]


def take_host_error() -> "BaseException | None":
    """The exception the last failed host call raised (then forgotten): the framework re-raised it as one of
    its own, which loses its type (constraint 6)."""
    exc = _host_error[0] if _host_error else None
    _host_error.clear()
    return exc


#: Constraint 7: the last host call created in each TF1 graph.
_last_host_op: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_on_host(fn: _HostFn, tensors: Sequence[Any], out_specs: Sequence[tuple[tuple[int, ...], str]],
                backend: str, *, what: str) -> list[Any]:
    """Run ``fn`` on torch views of ``tensors`` and return its outputs as backend tensors, from eager or
    compiled code alike (constraints 3-5).

    Args:
        fn: takes the inputs as torch tensors, returns torch tensors matching ``out_specs``.
        tensors: backend tensors (any mix of eager and symbolic of one backend).
        out_specs: ``(shape, dtype name)`` of every output (static: compiled code needs them).
        backend: the Keras backend.
        what: names the operation in errors (``"gradient allreduce"``).

    Raises:
        ShoalError: inside a TensorFlow ``jit_compile=True`` trace (XLA cannot call the host).
    """
    tensors = list(tensors)
    if backend == "torch":
        return list(fn(tensors))
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        def host(*args):
            try:
                outs = fn([to_torch(a) for a in args])
            except Exception as exc:
                _note_host_error(exc)  # TF re-raises it as its own UnknownError (constraint 6)
                raise
            return [from_torch(o, "tensorflow") for o in outs]

        if not in_tf_trace(backend):
            return host(*tensors)
        if in_xla_trace():
            raise ShoalError(
                f"shoal: the {what} runs on the host (tf.py_function), which XLA cannot compile, but this "
                "train step is being compiled with jit_compile=True. HINT: model.compile(..., "
                "jit_compile=False), or pass shoal.keras.callbacks.BroadcastGlobalVariablesCallback(0) to "
                "fit(), which turns XLA off for the train step (Keras' jit_compile='auto' turns it on "
                "whenever a GPU is visible).")
        graph = tf.compat.v1.get_default_graph()
        # Constraint 7: a TF1 graph, outside its control-flow constructs (whose bodies cannot depend on an op
        # outside them).
        chain = not tf.inside_function() and getattr(graph, "_get_control_flow_context", lambda: None)() is None
        previous = _last_host_op.get(graph) if chain else None
        with tf.control_dependencies([previous] if previous is not None else []):
            outs = tf.py_function(host, tensors, Tout=[tf.as_dtype(d) for _, d in out_specs], name="shoal_host")
        if chain and outs:
            _last_host_op[graph] = outs[0].op
        for o, (shape, _) in zip(outs, out_specs):
            o.set_shape(shape)
        return list(outs)
    if backend == "jax":
        import jax  # noqa: PLC0415
        from jax.experimental import io_callback  # noqa: PLC0415

        if not any(is_symbolic(t) for t in tensors):  # eager JAX: no callback needed
            return [from_torch(o, "jax") for o in fn([to_torch(t) for t in tensors])]

        def host(*args):
            try:
                outs = fn([to_torch(a) for a in args])
            except Exception as exc:
                _note_host_error(exc)  # JAX re-raises it as an XlaRuntimeError (constraint 6)
                raise
            return tuple(to_numpy(o) for o in outs)

        result = tuple(jax.ShapeDtypeStruct(tuple(s), jax.numpy.dtype(d)) for s, d in out_specs)
        return list(io_callback(host, result, *tensors, ordered=True))
    raise ShoalError(f"shoal: unsupported Keras backend {backend!r}")
