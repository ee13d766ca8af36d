"""Horovod's compressor interface for the PyTorch frontend: ``Compressor``, ``NoneCompressor``,
``FP16Compressor``, ``BF16Compressor`` and ``Compression`` with Horovod's behaviour.

Horovod's compressors are classes with two static methods, ``compress(tensor) -> (tensor, ctx)`` and
``decompress(tensor, ctx) -> tensor``, applied around each tensor of ``hvd.allreduce(..., compression=)``
(and its grouped and reducescatter forms); users write their own in that shape. Shoal's engine compresses
whole buckets instead (:mod:`shoal.core.compression`, by name). The classes here serve both: each built-in
one also carries the engine's ``name``, so ``hvd.DistributedOptimizer(opt, compression=hvd.Compression.fp16)``
selects the engine's fp16 buckets, while ``hvd.Compression.fp16.compress(t)`` behaves as Horovod's.

What lives elsewhere: the engine's compression (:mod:`shoal.core.compression`, whose other names,
e.g. ``Compression.mixed_fp16``, this ``Compression`` inherits unchanged); where ``compression=`` is applied
(:mod:`shoal.torch.functions`, :mod:`shoal.torch.optimizer`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from shoal.core import compression as _core

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor", "Compression", "as_pair",
           "engine_compression"]


class Compressor:
    """Horovod's interface: subclass it and override both static methods.

    ``name`` is the engine's compression for ``DistributedOptimizer`` (None for a user-defined compressor:
    the engine compresses buckets by name, so a per-tensor compressor of your own applies to the
    collectives' ``compression=`` only).

    Example:
        >>> class Halve(hvd.Compressor):
        ...     @staticmethod
        ...     def compress(tensor):
        ...         return tensor.to(torch.float16), tensor.dtype
        ...     @staticmethod
        ...     def decompress(tensor, ctx):
        ...         return tensor.to(ctx)
        >>> hvd.allreduce(x, compression=Halve)
    """

    name: Optional[str] = None

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Return the tensor to send and a context for :meth:`decompress`."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Return the received tensor in its original form."""
        raise NotImplementedError


class NoneCompressor(Compressor):
    """No compression: the tensor as it is (Horovod's ``Compression.none``)."""

    name = "none"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    original = tensor.dtype
    return (tensor.to(dtype) if tensor.dtype.is_floating_point else tensor), original


class _CastCompressor(Compressor):
    """Floating-point tensors travel as ``dtype``; others as they are; back to their own dtype after."""

    dtype: torch.dtype

    @classmethod
    def compress(cls, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return _cast(tensor, cls.dtype)

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor.to(ctx) if ctx is not None and ctx.is_floating_point else tensor


class FP16Compressor(_CastCompressor):
    """Floating-point tensors travel as float16; others as they are (Horovod's ``Compression.fp16``)."""

    name = "fp16"
    dtype = torch.float16


class BF16Compressor(_CastCompressor):
    """Floating-point tensors travel as bfloat16 (float32's range, 8 bits of mantissa)."""

    name = "bf16"
    dtype = torch.bfloat16


class Compression(_core.Compression):
    """Horovod's names with Horovod's interface (``none``, ``fp16``; ``bf16`` is ours); every other name
    of the engine's :class:`shoal.core.compression.Compression` (``mixed_fp16``, ...) is inherited as the
    engine's compressor, for ``DistributedOptimizer``."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor


class _EngineCast:
    """An engine compressor (:class:`shoal.core.compression.Compressor`) seen through Horovod's interface,
    for the collectives' ``compression=``: a cast to its 16-bit wire dtype and back."""

    def __init__(self, compressor: "_core.Compressor"):
        self.dtype = compressor.wire_dtype

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return _cast(tensor, self.dtype) if self.dtype is not None else (tensor, None)

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor.to(ctx) if ctx is not None and ctx.is_floating_point else tensor


def as_pair(compression: Any, what: str) -> Any:
    """``compression`` as an object with Horovod's ``compress`` / ``decompress`` (for the collectives).

    Raises:
        TypeError: it has neither Horovod's methods nor is an engine compressor with a 16-bit wire dtype.
    """
    if compression is None:
        return NoneCompressor
    if isinstance(compression, _core.Compressor):
        if compression.wire_dtype is None or compression.wire_dtype.is_floating_point:
            return _EngineCast(compression)
        raise TypeError(f"shoal: {what}: compression={compression.name!r} compresses whole buckets with "
                        "their peers; a single collective cannot use it. HINT: pass hvd.Compression.fp16 "
                        "or a compressor class of your own (compress/decompress).")
    if callable(getattr(compression, "compress", None)) and callable(getattr(compression, "decompress", None)):
        return compression
    raise TypeError(f"shoal: {what}: compression={compression!r} has no compress()/decompress(). HINT: pass "
                    "hvd.Compression.none or .fp16, or a subclass of hvd.Compressor.")


def engine_compression(compression: Any) -> Optional[str]:
    """The engine's compression name for ``DistributedOptimizer(compression=...)`` (None: the config's).

    Raises:
        ValueError: a compressor of the user's own (the engine compresses buckets by name), naming it.
    """
    if compression is not None and not isinstance(compression, (str, _core.Compressor)) \
            and getattr(compression, "name", None) is None:
        shown = getattr(compression, "__name__", None) or type(compression).__name__
        raise ValueError(f"shoal: DistributedOptimizer(compression={shown}): the gradient engine "
                         "compresses whole buckets and knows its compressors by name, so a per-tensor "
                         "compressor of your own cannot run inside it. HINT: use hvd.Compression.none, .fp16, "
                         ".bf16 or .mixed_fp16 here; your compressor works with hvd.allreduce(..., "
                         "compression=...).")
    return _core.resolve_compression(compression)
