"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019) as a per-bucket algorithm: low-rank gradients with
error feedback and warm start, for every frontend and the DDP hook alike.

Per compressed matrix M (``rows x cols``; a higher-D gradient is seen as ``shape[0] x rest``) and step, on
every rank w, with rank-r factors:

    D_w = M_w + e_w                      (error feedback: what earlier steps left out)
    P   = sum_w D_w Q                    (allreduce, rows x r; Q from the previous step: warm start)
    P   = orthonormal basis of P         (QR)
    Q_w = D_w^T P;  e_w = D_w - P Q_w^T  (the rank's own approximation error, the paper's Algorithm 2)
    Q   = sum_w Q_w                      (allreduce, cols x r)
    M   = P Q^T                          (the same on every rank; times the caller's scale)

Design constraints:

1. Two rounds per bucket. The tensors that stay in full precision (vectors, matrices too small to gain,
   whatever follows the last tensor: the negotiation's control slot) travel in the first allreduce
   together with every P of the bucket; the second carries every Q. (torch's ``powerSGD_hook`` runs a
   third round, for the uncompressed tensors, before the P round.) A matrix is compressed when its
   factors are less than half its size, ``(rows + cols) * r * 2 < rows * cols``, torch's criterion
   (``min_compression_rate=2``), so that the two compare like for like.
2. Matmuls in the layouts the CPU kernels like. Q is kept transposed (``r x cols``, row-major), so that
   P = D @ Qt^T and Qt = P^T @ D. Measured on one core here, 4096 x 4096, r = 4: ``D @ Q`` with Q
   ``cols x r`` contiguous 24 ms, ``D @ Qt.t()`` 7.7 ms; ``D.t() @ P`` 124 ms, ``P.t() @ D`` 8.8 ms
   (torch's hook uses the slow forms).
3. Error feedback in place, no allocation per step: the residual buffer becomes D (``e += M``), P and Q
   are computed from it, and ``e -= P Q_w^T`` is one in-place ``addmm_``. torch's hook clones the bucket
   and allocates the new error every step (a fresh 100 MB tensor cost ~100 ms here, reducer.py).
4. Warm start: Q persists per bucket (``ReduceContext.state``) and starts, on every rank alike, from a
   fixed seed; state restarts when the bucket's layout changes (a new bucket plan).
5. The same answer on every rank: P and Q are allreduced (the same bits everywhere); orthogonalization
   and decompression are local but deterministic functions of those bits (the same on ranks that run
   the same kernels: the same CPU or GPU model and thread count, as torch's hook assumes).
6. Full precision for the first ``start_step`` steps (the algorithm of the same hierarchy, fp32), counted
   by the caller's step number (``ReduceContext.step``), so that a re-planned bucket does not restart
   its warm-up.
7. Non-finite gradients: a NaN or Inf in any compressed matrix makes the reduced P non-finite on every
   rank (the decision is taken from reduced data, so every rank takes it): the matrices come out NaN,
   as in a full-precision sum, and the bucket's state restarts (Q from the seed, e zero) instead of
   carrying NaN into every later step. The NaN check, upstream, names the culprit as usual.
8. Mixed (``mixed_powersgd``, hierarchical): the bucket is first summed in full precision inside the
   node (the node-level chain of :mod:`._levels`), then every rank of the node runs the rounds above
   across nodes on its own cross group: the factors are tiny, so the G cross groups cost nothing on
   the slow link, and every rank of the node ends with the same bits without a node-level broadcast.
   The price is that each rank of a node computes the same factors (on GPUs, each on its own device).
9. All of a bucket's operations run on its stream's worker (:mod:`._pipeline`), in a fixed order: the
   two allreduces are waited for there, so nothing else of that stream interleaves differently on
   different ranks.

What lives elsewhere: the names and parameters (:mod:`shoal.core.compression`), the full-precision and
node-level algorithms (:mod:`.flat`, :mod:`.hierarchical`, :mod:`._levels`), choosing
(:func:`shoal.core.algorithms.get_algorithm`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import timeline as _timeline
from ._levels import Level, reduce_chain
from ._pipeline import worker_for

__all__ = ["allreduce_powersgd", "plan_matrices", "MatrixSlot", "SEED"]

#: Seed of the first Q (constraint 4); the same on every rank.
SEED = 0x5348
#: Compress a matrix when its factors are less than 1/MIN_COMPRESSION_RATE of it (constraint 1).
MIN_COMPRESSION_RATE = 2


@dataclass(frozen=True, slots=True)
class MatrixSlot:
    """One compressed matrix of a bucket: where it is, and where its factors and residual live."""

    offset: int  # in the bucket
    rows: int
    cols: int
    p: int  # offset of P (rows x r) in the P part of the first round's buffer
    q: int  # offset of Qt (r x cols) in the Q buffer
    e: int  # offset of its residual in the residual buffer


@dataclass(frozen=True, slots=True)
class _Plan:
    key: tuple
    mats: tuple[MatrixSlot, ...]
    #: ``(start, end)`` runs of the bucket that travel in full precision, in order.
    runs: tuple[tuple[int, int], ...]
    unc: int
    p_numel: int
    q_numel: int
    e_numel: int


def plan_matrices(numel: int, layout, rank: int) -> tuple[list[MatrixSlot], list[tuple[int, int]]]:
    """Split a bucket of ``numel`` elements into compressed matrices and full-precision runs.

    Args:
        numel: the bucket's length.
        layout: ``[(offset, shape), ...]`` of its tensors (None: one vector, nothing compressed).
        rank: the approximation rank.

    Returns:
        ``(matrices, runs)``: the compressed matrices in bucket order, and the ``(start, end)`` runs that
        are not part of any (vectors, small matrices, padding, a tail after the last tensor).

    Example:
        >>> mats, runs = plan_matrices(4096 + 64, [(0, (64, 64)), (4096, (64,))], rank=2)
        >>> [(m.rows, m.cols) for m in mats], runs
        ([(64, 64)], [(4096, 4160)])
    """
    mats: list[MatrixSlot] = []
    p = q = e = 0
    for offset, shape in sorted(layout or (), key=lambda t: t[0]):
        if len(shape) < 2:
            continue
        n = 1
        for d in shape:
            n *= d
        rows = int(shape[0])
        if rows == 0 or n == 0:
            continue
        cols = n // rows
        if (rows + cols) * rank * MIN_COMPRESSION_RATE >= rows * cols:
            continue
        mats.append(MatrixSlot(int(offset), rows, cols, p, q, e))
        p += rows * rank
        q += cols * rank
        e += n
    runs: list[tuple[int, int]] = []
    pos = 0
    for m in mats:
        if m.offset > pos:
            runs.append((pos, m.offset))
        pos = m.offset + m.rows * m.cols
    if pos < numel:
        runs.append((pos, numel))
    return mats, runs


def _plan(buffer: torch.Tensor, ctx, rank: int, state: dict) -> _Plan:
    """The bucket's plan, from ``state`` while its layout stays; ``state`` is the algorithm's own dict."""
    layout = ctx.layout() if ctx.layout is not None else None
    key = (buffer.numel(), rank, tuple((int(o), tuple(int(d) for d in s)) for o, s in (layout or ())))
    plan = state.get("plan")
    if plan is not None and plan.key == key:
        return plan
    mats, runs = plan_matrices(buffer.numel(), layout, rank)
    plan = _Plan(key, tuple(mats), tuple(runs), sum(b - a for a, b in runs), sum(m.rows for m in mats) * rank,
                 sum(m.cols for m in mats) * rank, sum(m.rows * m.cols for m in mats))
    state.clear()  # a new layout: new factors and residuals (constraint 4)
    state["plan"] = plan
    return plan


def _buffers(plan: _Plan, state: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first round's buffer, Qt, residual)`` of the bucket, created on the first compressed step."""
    bufs = state.get("buffers")
    if bufs is None:
        g = torch.Generator().manual_seed(SEED)
        q = torch.randn(plan.q_numel, generator=g, dtype=torch.float32).to(device)
        bufs = (torch.zeros(plan.unc + plan.p_numel, dtype=torch.float32, device=device), q,
                torch.zeros(plan.e_numel, dtype=torch.float32, device=device))
        state["buffers"] = bufs
    return bufs


def _track() -> str:
    return threading.current_thread().name


def powersgd_rounds(buffer: torch.Tensor, group, plan: _Plan, state: dict, rank: int, scale: float) -> None:
    """The rounds of the module docstring on ``buffer`` over ``group`` (run on the stream's worker)."""
    comm, qt, err = _buffers(plan, state, buffer.device)
    u = plan.unc
    track = _track()
    with _timeline.span("compression", "powersgd P", track, {"matrices": len(plan.mats)}):
        pos = 0
        for a, b in plan.runs:
            comm[pos:pos + b - a].copy_(buffer[a:b])
            pos += b - a
        for m in plan.mats:
            d = err[m.e:m.e + m.rows * m.cols].view(m.rows, m.cols)
            d.add_(buffer[m.offset:m.offset + m.rows * m.cols].view(m.rows, m.cols))  # D = M + e
            torch.mm(d, qt[m.q:m.q + m.cols * rank].view(rank, m.cols).t(),
                     out=comm[u + m.p:u + m.p + m.rows * rank].view(m.rows, rank))
    dist.all_reduce(comm, group=group)
    ps = comm[u:]
    finite = bool(torch.isfinite(ps).all()) if plan.mats else True
    with _timeline.span("compression", "powersgd Q", track):
        pos = 0
        for a, b in plan.runs:
            out = buffer[a:b]
            out.copy_(comm[pos:pos + b - a])
            if scale != 1.0:
                out.mul_(scale)
            pos += b - a
        if not finite:
            _restart(buffer, plan, state)
            return
        for m in plan.mats:
            p = comm[u + m.p:u + m.p + m.rows * rank].view(m.rows, rank)
            p.copy_(torch.linalg.qr(p).Q)
            d = err[m.e:m.e + m.rows * m.cols].view(m.rows, m.cols)
            q = qt[m.q:m.q + m.cols * rank].view(rank, m.cols)
            torch.mm(p.t(), d, out=q)  # Q_w^T
            d.addmm_(p, q, alpha=-1.0)  # e = D - P Q_w^T, in place
    if not plan.mats:
        return
    dist.all_reduce(qt, group=group)
    if scale != 1.0:
        qt.mul_(scale)
    if not bool(torch.isfinite(qt).all()):  # e.g. an overflow in the sum: the same on every rank
        _restart(buffer, plan, state)
        return
    with _timeline.span("decompression", "powersgd P Q^T", track):
        for m in plan.mats:
            torch.mm(comm[u + m.p:u + m.p + m.rows * rank].view(m.rows, rank),
                     qt[m.q:m.q + m.cols * rank].view(rank, m.cols),
                     out=buffer[m.offset:m.offset + m.rows * m.cols].view(m.rows, m.cols))


def _restart(buffer: torch.Tensor, plan: _Plan, state: dict) -> None:
    """Constraint 7: the compressed matrices come out NaN and the state starts again."""
    for m in plan.mats:
        buffer[m.offset:m.offset + m.rows * m.cols].fill_(float("nan"))
    state.pop("buffers", None)


def allreduce_powersgd(buffer: torch.Tensor, ctx, *, rank: int, start_step: int,
                       full_precision: Callable[[torch.Tensor, Any], torch.futures.Future],
                       node_level: Optional[Callable[[Any], Level]] = None,
                       cross_group: Optional[Callable[[Any], Any]] = None) -> torch.futures.Future:
    """Sum ``buffer`` across ``ctx.process_set`` with PowerSGD (the module docstring), in place.

    Args:
        buffer: a flat float32 bucket.
        ctx: a :class:`~shoal.core.algorithms.ReduceContext`: ``layout`` says which tensors are matrices
            (without it the bucket travels in full precision), ``step`` counts the warm-up, ``state``
            keeps Q and the residuals.
        rank: the approximation rank r.
        start_step: steps 1..start_step use ``full_precision``.
        full_precision: the algorithm of the warm-up steps (flat or hierarchical, fp32).
        node_level / cross_group: for ``mixed_powersgd``: the stream's node level (summed first, in
            full precision) and its cross-node group (where the rounds run), from the stream group.

    Returns:
        A future whose value is ``buffer``.

    Example:
        >>> algo = functools.partial(allreduce_powersgd, rank=4, start_step=10, full_precision=allreduce_flat)
        >>> algo(bucket, ctx).wait()
    """
    if ctx.step is None:  # a caller without a step counter: count this bucket's calls (constraint 6)
        step = ctx.state["powersgd_calls"] = ctx.state.get("powersgd_calls", 0) + 1
    else:
        step = ctx.step
    if step <= start_step or buffer.dtype != torch.float32:  # factors and residuals are float32
        return full_precision(buffer, ctx)
    worker = worker_for(ctx.group)
    state = ctx.state.setdefault("powersgd", {})

    def job() -> torch.Tensor:
        plan = _plan(buffer, ctx, rank, state)
        if node_level is None:
            if ctx.prescale != 1.0:
                buffer.mul_(ctx.prescale)
            powersgd_rounds(buffer, ctx.group, plan, state, rank, ctx.postscale)
            return buffer
        local = node_level(ctx.group)
        reduce_chain(buffer, [local], ctx.prescale, 1.0, {}, worker, False)
        powersgd_rounds(buffer, cross_group(ctx.group), plan, state, rank, ctx.postscale)
        return buffer

    return worker.submit(job)
