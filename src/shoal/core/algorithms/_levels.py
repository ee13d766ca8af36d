"""A bucket's reduction as a chain of levels: reduce-scatter up the levels, allreduce at the top,
allgather back down; each level in full precision or compressed on the wire (16 bits, or 8 bits with a
scale per block).

Flat 16-bit compression is a chain of one level (the stream's group); hierarchical allreduce is two
levels, the node (local group) below the cross-node group; mixed precision is a full-precision node
level under a 16-bit cross level. :mod:`.compressed` and :mod:`.hierarchical` build the chains; this
module runs them, chunk by chunk, on the stream's worker (:mod:`._pipeline`).

Design constraints:

1. 16 bits on the wire, 32 bits in the sum. gloo sums float16 slowly: over the emulated 1 Gbit/s link,
   a 25 MB float16 ``all_reduce`` took 540 ms where a float32 one of the same bytes took 438 ms, and on
   loopback 39 ms against 14 ms (2 ranks). So a 16-bit level is a reduce-scatter of 16-bit pieces,
   summed locally in float32 (torch's vectorized kernels), then an allgather of the 16-bit result: the
   same bytes per rank as a ring allreduce (2(n-1)/n of the chunk), one rounding of the sum instead of
   one per hop. Backends that sum 16 bits natively (NCCL) get one 16-bit ``all_reduce`` at the top.
2. Reduce-scatter and allgather are pairwise ``isend``/``irecv`` (one ``batch_isend_irecv`` per step),
   not gloo's own collectives: on loopback, 2 ranks, 4 MB, median of 40 (load ~10 on 2 cores):
   ``reduce_scatter_single`` 6.8 ms, ``all_to_all_single`` + sum 4.1 ms, pairwise + sum 3.0 ms;
   ``all_gather_single`` 4.7 ms, pairwise 2.7 ms (gloo queues collectives on per-group worker threads,
   point-to-point goes straight to the transport). Each stage has its own tag, so that stages of
   different chunks in flight between the same pair never match each other's messages.
3. In place: a level's reduce-scatter sums into this rank's own piece of its input (the bucket chunk
   itself at the bottom), the level above works on that piece, and the allgather fills the other pieces
   around it. Full-precision levels need no copy of the bucket at all; a 16-bit level needs a send and
   a receive buffer.
4. Overflow-safe: every scale factor is applied before the first cast, so that what travels in 16 bits
   is already divided by the number of ranks (for Average: the sum of n values near float16's maximum
   would overflow, their mean does not). A Sum is divided by n before and multiplied by n after, in
   float32. In full precision the numerics equal a flat allreduce: sum, then one multiply.
5. Every rank ends with the same bits: the sum is rounded once, by the rank that owns the piece, and
   the 16-bit result is gathered (the owner uses the rounded value too), never re-summed. A rank's own
   contribution to its own piece is never rounded (it does not travel), except under constraint 8.
6. Error feedback (opt-in): at every cast, what the rounding dropped is kept in a float32 residual
   (per bucket, in ``ReduceContext.state``) and added to the same elements before the next step's cast.
   Each rank owns the same shards every step, so a residual always meets the elements it came from.
7. A chunk's length is a multiple of the product of the level sizes (so that every reduce-scatter splits
   evenly); only the bucket's last chunk is padded, through a scratch copy.
8. Two members at the top level (two nodes, or a flat 16-bit allreduce of two ranks): the reduce-scatter
   and allgather become one exchange of the whole 16-bit piece, both ranks add the same two rounded
   values in float32 and keep the float32 sum: the same bytes on the wire (the piece each way), one stage
   and one wake-up less per chunk, and one rounding less.
9. 8 bits (``wire_dtype=torch.int8``) is one more wire format with the same guarantees: every piece
   travels as int8 blocks with a float32 scale each (:func:`shoal.core.compression.encode_int8`), the
   owner decodes and sums in float32 (no int8 sum can overflow, no scale is lost), the rounded sum is
   gathered as int8 blocks. A chunk's length is then a multiple of the levels' sizes times the block, so
   every piece is whole blocks and pieces concatenate without re-packing. Decoded values are added as
   two rounded operands (never a fused multiply-add), so both members of a pair compute the same bits.

What lives elsewhere: worker threads, chunk schedule and scratch (:mod:`._pipeline`), choosing the
levels (:func:`shoal.core.algorithms.get_algorithm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .. import timeline as _timeline
from ..compression import INT8_BLOCK, decode_int8, encode_int8, int8_wire_nbytes
from ._pipeline import Worker, chunk_bounds, run_stages

__all__ = ["Level", "make_level", "reduce_chain", "scale_factors", "CHUNK_NBYTES"]

#: Fixed chunk size in bytes of the bucket's dtype; None: about ``_CHUNKS_PER_BUCKET`` chunks per bucket,
#: clamped to ``_CHUNK_MIN_NBYTES..._CHUNK_MAX_NBYTES``. Small chunks pipeline better, big ones cost less
#: CPU per byte (fewer operations and thread wake-ups): see docs/compression.md ("chunk size").
CHUNK_NBYTES: Optional[int] = None
_CHUNKS_PER_BUCKET = 8
_CHUNK_MIN_NBYTES = 2 * 1024 * 1024
_CHUNK_MAX_NBYTES = 16 * 1024 * 1024

#: How many chunks the first stage runs ahead of the others (:func:`._pipeline.run_stages`).
_LEAD_CHUNKS = 2
#: Small first and last chunks (:func:`._pipeline.chunk_bounds`): shorter pipeline fill and drain.
_RAMP = True

#: Base of the point-to-point tags of the stages (constraint 2); stage s uses _TAG + s.
_TAG = 0x5348


@dataclass(frozen=True, slots=True)
class Level:
    """One level of a chain: this rank's process group at that level and the wire format."""

    group: Any  # dist.ProcessGroup
    #: Global ranks of the group, in group-rank order; piece j of a chunk belongs to ranks[j].
    ranks: tuple[int, ...]
    #: This rank's position in ``ranks``.
    index: int
    #: None: the bucket's own precision; else the dtype that travels (float16, bfloat16, or int8 blocks).
    wire_dtype: Optional[torch.dtype] = None
    #: The backend sums ``wire_dtype`` well (NCCL): one ``all_reduce`` in 16 bits at the top level.
    native_sum: bool = False

    @property
    def size(self) -> int:
        return len(self.ranks)


def make_level(group, wire_dtype: Optional[torch.dtype] = None) -> Level:
    """The :class:`Level` of this rank in ``group``."""
    ranks = tuple(dist.get_process_group_ranks(group))
    return Level(group, ranks, ranks.index(dist.get_rank()), wire_dtype,
                 native_sum=wire_dtype in (torch.float16, torch.bfloat16) and dist.get_backend(group) == "nccl")


def scale_factors(prescale: float, postscale: float, world: int, compressed: bool) -> tuple[float, float]:
    """``(before, after)`` multipliers: their product is ``prescale * postscale``.

    Full precision: Horovod's meaning (``prescale`` before the sum, ``postscale`` after). With 16 bits
    on the wire, everything is applied before the cast, but never less than a division by ``world``
    (constraint 4): for a Sum, 1/world before and world after.
    """
    if not compressed:
        return prescale, postscale
    if abs(postscale) * world <= 1.0:
        return prescale * postscale, 1.0
    return prescale / world, postscale * world


def _cast(dst16: torch.Tensor, src: torch.Tensor, residual: Optional[torch.Tensor],
          work: Optional[torch.Tensor] = None) -> None:
    """``dst16 = src`` rounded; with a residual: round ``src + residual`` and keep what was dropped.
    A uint8 ``dst16`` is an int8 wire (:func:`encode_int8`; ``work``: its float32 scratch)."""
    tl = _timeline.active()
    if tl is not None:  # compression on the timeline, on this stream's worker thread
        name = "encode int8" if dst16.dtype == torch.uint8 else f"cast to {dst16.dtype}"
        with tl.span("compression", name, _track(), {"numel": src.numel()}):
            _cast_now(dst16, src, residual, work)
        return
    _cast_now(dst16, src, residual, work)


def _track() -> str:
    import threading  # noqa: PLC0415
    return threading.current_thread().name


def _cast_now(dst16: torch.Tensor, src: torch.Tensor, residual: Optional[torch.Tensor],
              work: Optional[torch.Tensor] = None) -> None:
    if dst16.dtype == torch.uint8:
        encode_int8(dst16, src, residual, work)
        return
    if residual is None:
        dst16.copy_(src)
        return
    residual.add_(src)
    dst16.copy_(residual)
    residual.sub_(dst16)


def _wire_numel(wire_dtype: torch.dtype, numel: int) -> int:
    """Elements of the wire buffer that carries ``numel`` values."""
    return int8_wire_nbytes(numel) if wire_dtype == torch.int8 else numel


def _buffer_dtype(wire_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a wire buffer (int8 blocks with their scales travel as bytes)."""
    return torch.uint8 if wire_dtype == torch.int8 else wire_dtype


def _widen(dst: torch.Tensor, wire: torch.Tensor, add: bool = False,
           work: Optional[torch.Tensor] = None) -> None:
    """``dst`` (float) = (or +=) the values of ``wire``; ``dst`` may be shorter (a padded chunk)."""
    if wire.dtype == torch.uint8:  # decode_int8 adds two rounded operands (constraint 9)
        decode_int8(dst, wire, add=add, work=work)
    elif add:
        dst.add_(wire[:dst.numel()])
    else:
        dst.copy_(wire[:dst.numel()])


class _Works:
    """The works of one ``batch_isend_irecv``, waited together."""

    __slots__ = ("works",)

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        # Once only: waiting again on a finished gloo receive waits for another message (and times out).
        works, self.works = self.works, []
        for w in works:
            w.wait()


def _exchange(lv: Level, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], tag: int) -> _Works:
    """Send ``send[j]`` to member j and receive ``recv[j]`` from it, for every j but this rank."""
    ops = []
    for j, peer in enumerate(lv.ranks):
        if j != lv.index:
            ops.append(dist.P2POp(dist.irecv, recv[j], peer, lv.group, tag))
            ops.append(dist.P2POp(dist.isend, send[j], peer, lv.group, tag))
    return _Works(dist.batch_isend_irecv(ops))


class _Residuals:
    """Error-feedback residuals of one bucket, one float32 tensor per rounding site (constraint 6)."""

    def __init__(self, state: dict, key: tuple, device: torch.device):
        sites = state.get("error_feedback") if state.get("error_feedback_key") == key else None
        if sites is None:
            sites = {}
            state["error_feedback"] = sites
            state["error_feedback_key"] = key
        self._sites: dict = sites
        self._device = device

    def view(self, site: str, total: int, offset: int, numel: int) -> torch.Tensor:
        res = self._sites.get(site)
        if res is None or res.numel() != total:
            res = torch.zeros(total, dtype=torch.float32, device=self._device)
            self._sites[site] = res
        return res[offset:offset + numel]


def reduce_chain(buffer: torch.Tensor, levels: Sequence[Level], before: float, after: float, state: dict,
                 worker: Worker, error_feedback: bool, chunk_nbytes: Optional[int] = None) -> torch.Tensor:
    """Reduce ``buffer`` in place over ``levels`` (bottom first); runs on ``worker``'s thread.

    Args:
        buffer: the flat bucket (1-D, contiguous, floating point).
        levels: bottom level first; a 16-bit level may only sit under other 16-bit levels.
        before / after: multipliers before the first cast and after the result (:func:`scale_factors`).
        state: the bucket's persistent state (error-feedback residuals live there).
        worker: the stream's worker, for scratch buffers.
        error_feedback: keep and re-add what each rounding drops.
        chunk_nbytes: default :data:`CHUNK_NBYTES`, else adaptive.

    Returns:
        ``buffer``, holding the reduced, scaled result.
    """
    levels = [lv for lv in levels if lv.size > 1]
    numel = buffer.numel()
    if not levels or numel == 0:
        _scale(buffer, before * after)
        return buffer
    for lo, hi in zip(levels, levels[1:]):
        if lo.wire_dtype is not None and hi.wire_dtype is None:
            raise ValueError("reduce_chain: a full-precision level above a 16-bit one")
    if len({lv.wire_dtype for lv in levels if lv.wire_dtype is not None}) > 1:
        raise ValueError("reduce_chain: compressed levels with different wire formats")
    sizes = [lv.size for lv in levels]
    eight = any(lv.wire_dtype == torch.int8 for lv in levels)
    divisor = math.prod(sizes) * (INT8_BLOCK if eight else 1)  # constraint 9: pieces of whole blocks
    chunk_nbytes = chunk_nbytes or CHUNK_NBYTES or min(_CHUNK_MAX_NBYTES, max(
        _CHUNK_MIN_NBYTES, numel * buffer.element_size() // _CHUNKS_PER_BUCKET))
    chunk_numel = max(1, chunk_nbytes // buffer.element_size())
    bounds = chunk_bounds(numel, chunk_numel, divisor, ramp=_RAMP)
    padded = [-(-(hi - lo) // divisor) * divisor for lo, hi in bounds]
    # Level i works on a 1/below[i] piece of the chunk: this rank's piece after the levels beneath it.
    below = [math.prod(sizes[:i]) for i in range(len(levels) + 1)]
    device = buffer.device
    top = len(levels) - 1
    sixteen_top = levels[top].wire_dtype is not None and not levels[top].native_sum
    # Two members at the top: one exchange of the whole piece, both add the same two 16-bit values
    # (constraint 8). More members: reduce-scatter, then allgather of the rounded sums.
    top_pair = sixteen_top and levels[top].size == 2
    top_split = sixteen_top and not top_pair
    # Scale where the first 16-bit level starts (constraint 4): for mixed precision that is 1/G of the
    # chunk, after the node's full-precision sum, instead of the whole chunk.
    scale_at = next((i for i, lv in enumerate(levels) if lv.wire_dtype is not None), 0)
    residuals = None
    if error_feedback and any(lv.wire_dtype is not None for lv in levels):
        key = (numel, tuple(sizes), tuple(str(lv.wire_dtype) for lv in levels), chunk_numel)
        residuals = _Residuals(state, key, device)
    site_total = [(bounds[-1][0] + padded[-1]) // below[i] for i in range(len(levels) + 1)]

    nstages = 2 * top + 2 + (1 if top_split else 0)
    slots = nstages + _LEAD_CHUNKS
    xs: list[Optional[torch.Tensor]] = [None] * slots      # per slot: the chunk (or its padded copy)
    wide: list[Optional[torch.Tensor]] = [None] * slots    # per slot: the piece a stage works on, 32-bit
    narrow: list[Optional[torch.Tensor]] = [None] * slots  # per slot: a 16-bit result from above
    pending: list[Any] = [None] * slots                    # per slot: the sum to finish after a wait

    def scratch(role: str, level: int, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        return worker.scratch((role, level, slot), n, dtype, device)

    def wire(role: str, level: int, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A wire buffer for ``n`` values in ``dtype``'s format."""
        return worker.scratch((role, level, slot), _wire_numel(dtype, n), _buffer_dtype(dtype), device)

    def work(n: int) -> Optional[torch.Tensor]:
        """float32 scratch for 8-bit encoding and decoding, used within one stage only."""
        return worker.scratch(("int8 work",), n, torch.float32, device) if eight else None

    def residual(site: str, depth: int, k: int, n: int) -> Optional[torch.Tensor]:
        if residuals is None:
            return None
        return residuals.view(site, site_total[depth], bounds[k][0] // below[depth], n)

    def finish_sum(slot: int) -> None:
        """Complete the sum of the exchange this slot's last stage waited for (float32, in place)."""
        if pending[slot] is not None:
            pending[slot]()
            pending[slot] = None

    def add_parts(own: torch.Tensor, parts: list) -> None:
        for part in parts:
            if part.dtype == torch.uint8:
                _widen(own, part, add=True, work=work(own.numel()))
            else:
                own.add_(part)

    def reduce_scatter(i: int, k: int, stage: int) -> _Works:
        """Level ``i``: send every member its piece of ``wide``; keep ours as the next ``wide``."""
        slot, lv = k % slots, levels[i]
        src = wide[slot]
        n = src.numel()
        pieces = src.view(lv.size, -1)
        if lv.wire_dtype is None:
            send = pieces
            recv = scratch("recv", i, slot, n, src.dtype).view(lv.size, -1)
        else:
            send16 = wire("send", i, slot, n, lv.wire_dtype)
            res = residual(f"cast{i}", i, k, n)
            _cast(send16, src, res, work(n))
            if res is not None:  # our own piece does not travel: nothing of it was dropped
                res.view(lv.size, -1)[lv.index].zero_()
            send = send16.view(lv.size, -1)
            recv = wire("recv", i, slot, n, lv.wire_dtype).view(lv.size, -1)
        own = pieces[lv.index]
        pending[slot] = lambda: add_parts(own, [recv[j] for j in range(lv.size) if j != lv.index])
        wide[slot] = own
        return _exchange(lv, send, recv, _TAG + stage)

    def pair_exchange(k: int, stage: int) -> _Works:
        """Top level of two members: swap the whole 16-bit piece; both compute a + b from the same
        two rounded values (commutative, so bitwise the same on both)."""
        slot, lv = k % slots, levels[top]
        src = wide[slot]
        n = src.numel()
        send16 = wire("send", top, slot, n, lv.wire_dtype)
        _cast(send16, src, residual(f"cast{top}", top, k, n), work(n))
        recv16 = wire("recv", top, slot, n, lv.wire_dtype)

        def pair_sum() -> None:
            _widen(src, send16)
            _widen(src, recv16, add=True, work=work(n))

        pending[slot] = pair_sum
        return _exchange(lv, [send16] * 2, [recv16] * 2, _TAG + stage)

    # -------------------------------------------------------------------------------------- stages
    def first(k: int) -> Any:
        slot = k % slots
        lo, hi = bounds[k]
        x = buffer[lo:hi]
        if padded[k] != hi - lo:
            pad = scratch("pad", 0, slot, padded[k], buffer.dtype)
            pad[:hi - lo].copy_(x)
            pad[hi - lo:].zero_()
            x = pad
        xs[slot] = wide[slot] = x
        return down(0, k, 0)

    def down(i: int, k: int, stage: int) -> Any:
        """Reduce-scatter over level ``i`` (below the top, or the top's first half); or the top's allreduce."""
        slot, lv = k % slots, levels[i]
        finish_sum(slot)
        if i == scale_at:
            _scale(wide[slot], before)
        if i < top or top_split:
            return reduce_scatter(i, k, stage)
        if top_pair:
            return pair_exchange(k, stage)
        src = wide[slot]
        if lv.wire_dtype is None:
            return dist.all_reduce(src, group=lv.group, async_op=True)
        w = scratch("send", i, slot, src.numel(), lv.wire_dtype)
        _cast(w, src, residual(f"cast{i}", i, k, src.numel()))
        narrow[slot] = w
        return dist.all_reduce(w, group=lv.group, async_op=True)

    def top_gather(k: int, stage: int) -> Any:
        """The top level's second half: round our summed piece once, gather everyone's."""
        slot, lv = k % slots, levels[top]
        finish_sum(slot)
        own = wide[slot]
        out = wire("send", top, slot, own.numel() * lv.size, lv.wire_dtype)  # its sends completed
        pieces = out.view(lv.size, -1)
        _cast(pieces[lv.index], own, residual(f"sum{top}", top + 1, k, own.numel()), work(own.numel()))
        narrow[slot] = out
        return _exchange(lv, [pieces[lv.index]] * lv.size, pieces, _TAG + stage)

    def up(i: int, k: int, stage: int) -> Any:
        """Allgather over level ``i`` < top of the piece the level above returned."""
        slot, lv = k % slots, levels[i]
        finish_sum(slot)
        above = narrow[slot]
        if lv.wire_dtype is None:
            # Our piece of this level's input is the level above's input: x's pieces, in place.
            pieces = wide_of(slot, i).view(lv.size, -1)
            if above is not None:  # a 16-bit result from above: widen it into our piece
                _widen(pieces[lv.index], above)
                narrow[slot] = None
            return _exchange(lv, [pieces[lv.index]] * lv.size, pieces, _TAG + stage)
        mine = wide_of(slot, i + 1)  # this level's share; the level above's result if that was float32
        out = wire("send", i, slot, mine.numel() * lv.size, lv.wire_dtype)  # its sends completed
        pieces = out.view(lv.size, -1)
        if above is not None:  # the same wire format: our piece's bytes as they are (constraint 9)
            pieces[lv.index].copy_(above)
        else:  # a float32 result from the top (a pair exchange): round it once for this 16-bit level
            _cast(pieces[lv.index], mine, residual(f"result{top}", i + 1, k, mine.numel()), work(mine.numel()))
        narrow[slot] = out
        return _exchange(lv, [pieces[lv.index]] * lv.size, pieces, _TAG + stage)

    def wide_of(slot: int, i: int) -> torch.Tensor:
        """This rank's piece of the chunk at level ``i`` (a view of x)."""
        x = xs[slot]
        for j in range(i):
            x = x.view(levels[j].size, -1)[levels[j].index]
        return x

    def last(k: int) -> None:
        slot = k % slots
        finish_sum(slot)
        lo, hi = bounds[k]
        x, target = xs[slot], buffer[lo:hi]
        if narrow[slot] is not None:  # every level was 16-bit: widen the whole chunk
            with _timeline.span("decompression", "widen", _track()):
                _widen(target, narrow[slot])
        elif x.data_ptr() != target.data_ptr():
            target.copy_(x[:hi - lo])
        _scale(target, after)
        xs[slot] = wide[slot] = narrow[slot] = None

    stages: list = [first]
    stages += [lambda k, i=i, s=len(stages) + i - 1: down(i, k, s) for i in range(1, top + 1)]
    if top_split:
        stages.append(lambda k, s=len(stages): top_gather(k, s))
    base = len(stages)
    stages += [lambda k, i=i, s=base + (top - 1 - i): up(i, k, s) for i in range(top - 1, -1, -1)]
    stages.append(last)
    if len(stages) != nstages:
        raise AssertionError(f"reduce_chain: {len(stages)} stages, expected {nstages}")
    run_stages(stages, len(bounds), lead=_LEAD_CHUNKS)
    return buffer


def _scale(t: torch.Tensor, factor: float) -> None:
    if factor != 1.0:
        t.mul_(factor)
