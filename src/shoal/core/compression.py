"""Wire compression of gradients: one small interface, one implementation for every frontend.

A :class:`Compressor` says how a bucket travels: its wire format, and whether it is compressed on every
stage or only across nodes ("mixed"). The names follow Horovod (``Compression.none``,
``Compression.fp16``) so that ``hvd.DistributedOptimizer(..., compression=hvd.Compression.fp16)`` works
unchanged; the others are ours:

==================  ==========================================================================
name                on the wire
==================  ==========================================================================
``none``            the gradients' own dtype
``fp16``            float16 on every stage (flat: the whole allreduce; hierarchical: inside and across nodes)
``bf16``            bfloat16, likewise (float32's range, 8 bits of mantissa instead of 11)
``int8``            8-bit integers with one float32 scale per block of :data:`INT8_BLOCK` values, error
                    feedback always on; summed in float32 by the owner of each piece
``powersgd``        low rank (PowerSGD): each matrix M (a 2-D gradient, or a higher-D one seen as
                    ``shape[0] x rest``) travels as two thin factors P = M Q and Q = M^T P, with error
                    feedback and warm start; vectors and small matrices travel in full precision in the
                    same bucket; the first ``start_step`` steps are full precision
``mixed_<x>``       ``<x>`` only where bytes cross nodes: full precision inside a node (hierarchical: the
                    cross-node stage only; flat across nodes: everything; one node: nothing)
==================  ==========================================================================

Parameters ride in the name, so that they are part of the setting that ranks compare at registration:
``powersgd:rank=4,start_step=10``, or ``hvd.Compression.powersgd(rank=4, start_step=10)`` whose ``name``
is that string. Defaults are left out of the name (``Compression.powersgd`` is ``powersgd``).

What lives elsewhere: the algorithms that put compressed buckets on the wire (overflow-safe scaling,
transfers summed in float32, error feedback, the PowerSGD rounds): :mod:`shoal.core.algorithms`. This
module owns the names, their parameters, and the 8-bit block codec (:func:`encode_int8`,
:func:`decode_int8`) those algorithms call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from .config import COMPRESSION_NAMES

__all__ = ["Compressor", "Compression", "resolve_compression", "get_compressor", "COMPRESSION_NAMES",
           "INT8_BLOCK", "int8_wire_nbytes", "encode_int8", "decode_int8"]

#: Parameters of each family with parameters, in the order the canonical name lists them, and their
#: defaults. PowerSGD: rank 4 (torch's hook defaults to 1, which its authors found too coarse for most
#: models; Vogels et al. used 1-4), 100 full-precision steps first (the early steps change the
#: gradients' subspace fastest; torch's hook defaults to 1000).
_PARAMS: dict[str, tuple[tuple[str, int], ...]] = {"powersgd": (("rank", 4), ("start_step", 100))}
_MINIMUM = {"rank": 1, "start_step": 0}


@dataclass(frozen=True, slots=True)
class Compressor:
    """How a bucket travels.

    Attributes:
        name: the config value (``SHOAL_COMPRESSION``), parameters included.
        wire_dtype: the element dtype on the wire: float16 / bfloat16, ``torch.int8`` (block-scaled, see
            :func:`encode_int8`), or None (the gradients' own; PowerSGD sends float32 factors).
        cross_node_only: True for the mixed variants: full precision inside a node.
        family: ``none``, ``fp16``, ``bf16``, ``int8`` or ``powersgd`` (the name without ``mixed_`` and
            parameters).
        params: ``(key, value)`` pairs, every parameter of the family (defaults included).

    Example:
        >>> Compression.powersgd(rank=2).name
        'powersgd:rank=2'
        >>> get_compressor("mixed_powersgd:start_step=0").param("rank")
        4
    """

    name: str
    wire_dtype: Optional[torch.dtype]
    cross_node_only: bool = False
    family: str = "none"
    params: tuple[tuple[str, int], ...] = ()

    def __call__(self, **params: int) -> "Compressor":
        """This compressor with other parameters: ``Compression.powersgd(rank=4, start_step=10)``.

        Raises:
            TypeError: a parameter this family does not have (the message lists those it has).
            ValueError: a value that is not an integer or is below its minimum.
        """
        known = dict(_PARAMS.get(self.family, ()))
        unknown = sorted(set(params) - set(known))
        if unknown:
            have = ", ".join(known) if known else "none"
            raise TypeError(f"shoal: Compression.{self.name.partition(':')[0]} has no parameter "
                            f"{', '.join(unknown)} (its parameters: {have})")
        values = dict(self.params)
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < _MINIMUM[key]:
                raise ValueError(f"shoal: compression parameter {key}={value!r} must be an integer >= "
                                 f"{_MINIMUM[key]} (in {self.name.partition(':')[0]})")
            values[key] = value
        ordered = tuple((key, values[key]) for key, _ in _PARAMS.get(self.family, ()))
        base = self.name.partition(":")[0]
        shown = [f"{k}={v}" for (k, v), (_, d) in zip(ordered, _PARAMS.get(self.family, ())) if v != d]
        return replace(self, name=base + (":" + ",".join(shown) if shown else ""), params=ordered)

    def param(self, key: str) -> int:
        """The value of parameter ``key`` (KeyError when the family has no such parameter)."""
        return dict(self.params)[key]

    @property
    def low_rank(self) -> bool:
        """Whether this is PowerSGD (stateful per bucket: no per-tensor :meth:`compress`)."""
        return self.family == "powersgd"

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        """The wire form of ``tensor`` (a new tensor when the format changes; non-floats as they are).

        8-bit: the uint8 wire of :func:`encode_int8` (the tensor padded to whole blocks).

        Raises:
            TypeError: for PowerSGD, whose factors depend on every rank's matrix and on the previous step.
        """
        if self.low_rank:
            raise TypeError("shoal: PowerSGD compresses a bucket with its peers, not a tensor alone. HINT: "
                            "pass it as compression= to DistributedOptimizer or comm_hook.")
        if self.wire_dtype is None or not tensor.is_floating_point() or tensor.dtype == self.wire_dtype:
            return tensor
        if self.wire_dtype == torch.int8:
            flat = tensor.reshape(-1).float()
            padded = -(-flat.numel() // INT8_BLOCK) * INT8_BLOCK
            src = torch.zeros(padded)
            src[:flat.numel()] = flat
            wire = torch.empty(int8_wire_nbytes(padded), dtype=torch.uint8)
            encode_int8(wire, src)
            return wire
        return tensor.to(self.wire_dtype)

    def decompress(self, wire: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Back to ``like``'s dtype (written into ``like`` when they differ, which is returned)."""
        if wire.dtype == like.dtype:
            return wire
        if self.wire_dtype == torch.int8 and wire.dtype == torch.uint8:
            out = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
            decode_int8(out, wire)
            return like.copy_(out.view(like.shape))
        return like.copy_(wire)


class Compression:
    """Horovod's names for the compressors, and ours (see the module docstring). The parameterized ones
    are callable: ``Compression.powersgd(rank=4, start_step=10)``."""

    none = Compressor("none", None)
    fp16 = Compressor("fp16", torch.float16, family="fp16")
    bf16 = Compressor("bf16", torch.bfloat16, family="bf16")
    mixed_fp16 = Compressor("mixed_fp16", torch.float16, cross_node_only=True, family="fp16")
    mixed_bf16 = Compressor("mixed_bf16", torch.bfloat16, cross_node_only=True, family="bf16")
    int8 = Compressor("int8", torch.int8, family="int8")
    mixed_int8 = Compressor("mixed_int8", torch.int8, cross_node_only=True, family="int8")
    powersgd = Compressor("powersgd", None, family="powersgd", params=_PARAMS["powersgd"])
    mixed_powersgd = Compressor("mixed_powersgd", None, cross_node_only=True, family="powersgd",
                                params=_PARAMS["powersgd"])


#: Every valid compression name (the ``compression`` knob's values, shoal.core.config), each a
#: :class:`Compression` attribute.
_BY_NAME = {name: getattr(Compression, name) for name in COMPRESSION_NAMES}


def get_compressor(name: str) -> Compressor:
    """The :class:`Compressor` called ``name``, parameters included (``powersgd:rank=2,start_step=0``).

    Raises:
        ValueError: an unknown name, or parameters that do not parse (the message lists the valid ones).

    Example:
        >>> get_compressor("powersgd:rank=2").param("rank")
        2
    """
    base, sep, rest = str(name).partition(":")
    comp = _BY_NAME.get(base)
    if comp is None:
        raise ValueError(f"shoal: unknown compression {name!r}; use one of {', '.join(COMPRESSION_NAMES)} "
                         "(hvd.Compression.<name>)")
    if not sep:
        return comp
    keys = ", ".join(k for k, _ in _PARAMS.get(comp.family, ())) or "none"
    params: dict[str, int] = {}
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        try:
            if not eq or key in params:
                raise ValueError
            params[key] = int(value)
        except ValueError:
            raise ValueError(f"shoal: compression {name!r}: cannot parse {item!r}; write {base}:key=value,... "
                             f"with integer values (parameters of {base}: {keys})") from None
    try:
        return comp(**params)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def resolve_compression(value: Union[None, str, Compressor]) -> Optional[str]:
    """Accept ``None``, a name (parameters included) or a :class:`Compressor`; return the config value
    (None: use the config).

    Raises:
        ValueError: an unknown name or bad parameters.
    """
    if value is None:
        return None
    if isinstance(value, Compressor):
        return value.name
    name = getattr(value, "name", value)
    try:
        return get_compressor(name).name
    except ValueError as exc:
        raise ValueError(f"{exc}; use Compression.{', Compression.'.join(COMPRESSION_NAMES)}") from None


# ----------------------------------------------------------------------------------- 8-bit codec
#
# Design constraints:
#
# 1. A scale per block, not per bucket: one large gradient must not flatten a small one's values to zero.
#    A block of 256 values costs 4 bytes of scale (1.6% on top of the 8-bit payload).
# 2. Blocks are self-contained on the wire: each block's 256 int8 values are followed by its float32 scale,
#    so that any run of whole blocks (a rank's piece, a pipeline chunk) is a contiguous run of bytes, and
#    the pieces of one level concatenate into the piece of the level below without re-packing.
# 3. Symmetric, round to nearest: scale = max|x| / 127 over the block, q = round(x / scale); the value
#    with the largest magnitude is exact and |x - q * scale| <= scale / 2 for the others. With error
#    feedback, what was dropped (x - q * scale) is kept and added to the same elements next time.
# 4. Fast on CPU: max|x| as max(amax, -amin) (torch's ``abs`` then ``amax`` took 35 ms for 50 MB here,
#    ``amax`` and ``amin`` 3.5 ms each); int8 -> float by copy then multiply (6 ms for 50 MB; torch's
#    mixed-dtype multiply 43 ms). Encoding 50 MB with error feedback: ~25 ms on one core of this machine.
# 5. Non-finite input gives a non-finite scale, so the decoded block is NaN on every rank (the NaN
#    check's world stays the same as in full precision), and the block's residual restarts at zero
#    instead of carrying NaN into every later step.

#: Values per scale (constraint 1); a multiple of 4 keeps the scales 4-byte aligned (constraint 2).
INT8_BLOCK = 256
_BLOCK_NBYTES = INT8_BLOCK + 4
#: The smallest normal float32: an all-zero block gets this scale (0 / scale = 0, never 0 / 0).
_TINY = torch.finfo(torch.float32).tiny


def int8_wire_nbytes(numel: int) -> int:
    """Bytes on the wire for ``numel`` values (rounded up to whole blocks)."""
    return -(-numel // INT8_BLOCK) * _BLOCK_NBYTES


def _blocks(wire: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = wire[:nblocks * _BLOCK_NBYTES].view(nblocks, _BLOCK_NBYTES)
    return rows[:, :INT8_BLOCK].view(torch.int8), rows[:, INT8_BLOCK:].view(torch.float32)


def encode_int8(wire: torch.Tensor, src: torch.Tensor, residual: Optional[torch.Tensor] = None,
                work: Optional[torch.Tensor] = None) -> None:
    """Quantize ``src`` into ``wire`` (constraints 2, 3, 5).

    Args:
        wire: uint8, :func:`int8_wire_nbytes` of ``src.numel()``.
        src: 1-D, contiguous, floating point; its length a multiple of :data:`INT8_BLOCK`.
        residual: float32 like ``src`` or None. Given: ``src + residual`` is quantized and ``residual``
            becomes what the quantization dropped (error feedback).
        work: float32 scratch of ``src.numel()`` elements (allocated when None).

    Example:
        >>> wire = torch.empty(int8_wire_nbytes(512), dtype=torch.uint8); encode_int8(wire, torch.randn(512))
    """
    n = src.numel()
    if n % INT8_BLOCK:
        raise ValueError(f"encode_int8: {n} values is not a multiple of the block ({INT8_BLOCK})")
    nb = n // INT8_BLOCK
    if nb == 0:
        return
    data, scales = _blocks(wire, nb)
    if residual is not None:
        residual.add_(src)
        v = residual.view(nb, INT8_BLOCK)
    else:
        v = src.view(nb, INT8_BLOCK)
    scale = torch.maximum(v.amax(1, keepdim=True), v.amin(1, keepdim=True).neg_()).div_(127.0)
    scale.clamp_(min=_TINY)  # NaN stays NaN (clamp propagates it)
    scales.copy_(scale)
    t = (work[:n] if work is not None else torch.empty(n, dtype=torch.float32, device=src.device))
    t = t.view(nb, INT8_BLOCK)
    torch.div(v, scale, out=t)
    t.round_()
    data.copy_(t)
    if residual is not None:
        v.addcmul_(t, scale, value=-1.0)
        finite = torch.isfinite(scale)
        if not bool(finite.all()):
            v.masked_fill_(~finite, 0.0)


def decode_int8(dst: torch.Tensor, wire: torch.Tensor, add: bool = False,
                work: Optional[torch.Tensor] = None) -> None:
    """Write (``add``: add) the values in ``wire`` into ``dst`` (float, 1-D, contiguous). Adding adds the
    decoded value (``q * scale`` rounded), so ``a + decoded(b)`` and ``b + decoded(a)`` agree bitwise when
    ``a`` and ``b`` are themselves decoded values.

    ``dst`` may be shorter than the blocks in ``wire`` (a padded last chunk): the extra values are dropped.

    Args:
        work: float32 scratch of ``dst.numel()`` elements for ``add`` (allocated when None).
    """
    n = dst.numel()
    nb, rem = divmod(n, INT8_BLOCK)
    data, scales = _blocks(wire, nb + (1 if rem else 0))
    if nb:
        out = dst[:nb * INT8_BLOCK].view(nb, INT8_BLOCK)
        if add:
            t = (work[:nb * INT8_BLOCK] if work is not None else
                 torch.empty(nb * INT8_BLOCK, dtype=torch.float32, device=dst.device)).view(nb, INT8_BLOCK)
            t.copy_(data[:nb])
            out.add_(t.mul_(scales[:nb]))  # never a fused multiply-add: x + (q * s) rounded as written
        else:
            out.copy_(data[:nb])
            out.mul_(scales[:nb])
    if rem:
        last = data[nb].float().mul_(scales[nb])[:rem]
        if add:
            dst[nb * INT8_BLOCK:].add_(last)
        else:
            dst[nb * INT8_BLOCK:].copy_(last)
