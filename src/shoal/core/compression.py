"""Wire compression of gradients: one small interface, one implementation for every frontend.

A :class:`Compressor` turns a flat tensor into its wire form and back. The names follow Horovod
(``Compression.none``, ``Compression.fp16``) so that ``hvd.DistributedOptimizer(..., compression=
hvd.Compression.fp16)`` works unchanged; ``bf16`` is ours. The algorithms that put compressed buckets on the
wire live in :mod:`shoal.core.algorithms`; this module only says what the wire dtype is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["Compressor", "Compression", "resolve_compression"]


@dataclass(frozen=True, slots=True)
class Compressor:
    """How a bucket travels: ``name`` (the config value) and ``wire_dtype`` (None: as it is)."""

    name: str
    wire_dtype: Optional[torch.dtype]

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        """The wire form of ``tensor`` (a new tensor when the dtype changes)."""
        if self.wire_dtype is None or not tensor.is_floating_point() or tensor.dtype == self.wire_dtype:
            return tensor
        return tensor.to(self.wire_dtype)

    def decompress(self, wire: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Back to ``like``'s dtype (written into ``like`` when they differ, which is returned)."""
        if wire.dtype == like.dtype:
            return wire
        return like.copy_(wire)


class Compression:
    """Horovod's names for the compressors."""

    none = Compressor("none", None)
    fp16 = Compressor("fp16", torch.float16)
    bf16 = Compressor("bf16", torch.bfloat16)


def resolve_compression(value: Union[None, str, Compressor]) -> Optional[str]:
    """Accept ``None``, a name or a :class:`Compressor`; return the config name (None: use the config)."""
    if value is None:
        return None
    if isinstance(value, Compressor):
        return value.name
    name = getattr(value, "name", value)
    if name not in ("none", "fp16", "bf16"):
        raise ValueError(f"shoal: unknown compression {value!r}; use Compression.none, .fp16 or .bf16")
    return name
