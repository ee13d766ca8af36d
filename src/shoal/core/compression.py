"""Wire compression of gradients: one small interface, one implementation for every frontend.

A :class:`Compressor` says how a bucket travels: its wire dtype, and whether 16 bits are used on every
stage or only across nodes ("mixed"). The names follow Horovod (``Compression.none``,
``Compression.fp16``) so that ``hvd.DistributedOptimizer(..., compression=hvd.Compression.fp16)`` works
unchanged; ``bf16`` and the mixed variants are ours:

==============  ==============================================================================
name            on the wire
==============  ==============================================================================
``none``        the gradients' own dtype
``fp16``        float16 on every stage (flat: the whole allreduce; hierarchical: inside and across nodes)
``bf16``        bfloat16, likewise (float32's range, 8 bits of mantissa instead of 11)
``mixed_fp16``  float16 only where bytes cross nodes: full precision inside a node (hierarchical: the
                cross-node stage only; flat across nodes: everything; one node: nothing)
``mixed_bf16``  the same with bfloat16
==============  ==============================================================================

What lives elsewhere: the algorithms that put compressed buckets on the wire (overflow-safe scaling,
16-bit transfers summed in float32, error feedback): :mod:`shoal.core.algorithms`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import COMPRESSION_NAMES

__all__ = ["Compressor", "Compression", "resolve_compression", "get_compressor", "COMPRESSION_NAMES"]


@dataclass(frozen=True, slots=True)
class Compressor:
    """How a bucket travels.

    Attributes:
        name: the config value (``SHOAL_COMPRESSION``).
        wire_dtype: the 16-bit dtype on the wire, or None (as it is).
        cross_node_only: True for the mixed variants: full precision inside a node.
    """

    name: str
    wire_dtype: Optional[torch.dtype]
    cross_node_only: bool = False

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        """The wire form of ``tensor`` (a new tensor when the dtype changes; non-floats as they are)."""
        if self.wire_dtype is None or not tensor.is_floating_point() or tensor.dtype == self.wire_dtype:
            return tensor
        return tensor.to(self.wire_dtype)

    def decompress(self, wire: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Back to ``like``'s dtype (written into ``like`` when they differ, which is returned)."""
        if wire.dtype == like.dtype:
            return wire
        return like.copy_(wire)


class Compression:
    """Horovod's names for the compressors, and ours (see the module docstring)."""

    none = Compressor("none", None)
    fp16 = Compressor("fp16", torch.float16)
    bf16 = Compressor("bf16", torch.bfloat16)
    mixed_fp16 = Compressor("mixed_fp16", torch.float16, cross_node_only=True)
    mixed_bf16 = Compressor("mixed_bf16", torch.bfloat16, cross_node_only=True)


#: Every valid compression name (the ``compression`` knob's values, shoal.core.config), each a
#: :class:`Compression` attribute.
_BY_NAME = {name: getattr(Compression, name) for name in COMPRESSION_NAMES}


def get_compressor(name: str) -> Compressor:
    """The :class:`Compressor` called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"shoal: unknown compression {name!r}; use one of {', '.join(COMPRESSION_NAMES)} "
                         "(hvd.Compression.<name>)") from None


def resolve_compression(value: Union[None, str, Compressor]) -> Optional[str]:
    """Accept ``None``, a name or a :class:`Compressor`; return the config name (None: use the config)."""
    if value is None:
        return None
    if isinstance(value, Compressor):
        return value.name
    name = getattr(value, "name", value)
    if name not in _BY_NAME:
        raise ValueError(f"shoal: unknown compression {value!r}; use Compression."
                         f"{', Compression.'.join(COMPRESSION_NAMES)}")
    return name
