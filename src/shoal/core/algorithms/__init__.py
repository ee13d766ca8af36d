"""Per-bucket reduction algorithms: one function each, ``algorithm(buffer, ctx) -> Future``.

An algorithm starts the reduction of one flat bucket in place and returns a ``torch.futures.Future`` that
completes when ``buffer`` holds the reduced, scaled result. Variants (compression, hierarchical) are built
by composition, as torch's DDP comm hooks are; the reducer and the DDP comm-hook adapter both call them, so
each algorithm exists once.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import runtime
from ..compression import get_compressor
from ..ops import ReduceOp
from .adasum import allreduce_adasum
from .compressed import allreduce_bf16, allreduce_fp16, allreduce_int8
from .flat import allreduce_flat
from .hierarchical import StreamNodeGroups, allreduce_hierarchical, use_hierarchical
from .powersgd import allreduce_powersgd

__all__ = ["ReduceContext", "Algorithm", "get_algorithm", "allreduce_flat", "allreduce_fp16", "allreduce_bf16",
           "allreduce_int8", "allreduce_powersgd", "allreduce_hierarchical", "allreduce_adasum",
           "use_hierarchical", "start_allreduce", "start_adasum"]


@dataclass(slots=True)
class ReduceContext:
    """What an algorithm needs besides the buffer."""

    #: The stream's process group (spans ``process_set``'s ranks).
    group: dist.ProcessGroup
    process_set: runtime.ProcessSet
    #: Multiply before the sum (Horovod's prescale_factor).
    prescale: float = 1.0
    #: Multiply after the sum (Horovod's postscale_factor, times 1/n for Average).
    postscale: float = 1.0
    bucket_index: int = 0
    #: Lazily lists the bucket's tensor names (for error messages only; not called on the hot path).
    names: Optional[Callable[[], list[str]]] = None
    #: Per-bucket state that persists across steps (e.g. error-feedback residuals); owned by the caller,
    #: reset when the bucket plan changes.
    state: dict = field(default_factory=dict)
    #: Sizes (numel) of the bucket's tensors, in buffer order, for algorithms that work tensor by tensor
    #: (Adasum); None: the buffer is one tensor.
    segments: Optional[list[int]] = None
    #: The 1-based number of the step this bucket belongs to (the caller's step counter: PowerSGD's
    #: warm-up counts it); None: the algorithm counts this bucket's calls itself (in ``state``).
    step: Optional[int] = None
    #: Lazily lists ``(offset, shape)`` of the bucket's tensors in the buffer, in elements (for algorithms
    #: that treat tensors by shape or keep what follows the last tensor exact: PowerSGD, 8 bits); None:
    #: the buffer is one vector.
    layout: Optional[Callable[[], list[tuple[int, tuple[int, ...]]]]] = None


Algorithm = Callable[["torch.Tensor", ReduceContext], "torch.futures.Future"]  # noqa: F821


def get_algorithm(compression: str, hierarchical: str, process_set: runtime.ProcessSet, *,
                  num_streams: Optional[int] = None, error_feedback: Optional[bool] = None,
                  op: ReduceOp = ReduceOp.Sum) -> Algorithm:
    """Pick the algorithm for a reducer (or the DDP hook) from its settings.

    Call it on every rank in the same order: with hierarchical allreduce it creates the per-stream node
    groups on first use (collective over the world).

    Args:
        compression: a name of :data:`shoal.core.compression.COMPRESSION_NAMES`, parameters included
            (``powersgd:rank=2``).
        hierarchical: ``auto`` / ``on`` / ``off`` (:func:`.hierarchical.use_hierarchical`).
        process_set: the ranks to reduce over.
        num_streams: the caller's stream count (default: the config's); hierarchical needs it to map
            each stream group to that stream's node groups.
        error_feedback: keep what 16-bit rounding drops, per bucket (default: the config's; 8 bits and
            PowerSGD always keep it).
        op: ``ReduceOp.Adasum`` selects :func:`allreduce_adasum` (full precision, flat: its exchanges are
            point to point and per tensor, so compression and hierarchy do not apply; the caller sets
            ``ctx.segments``); any other op sums (Average is a sum and a postscale).

    Returns:
        ``algorithm(buffer, ctx) -> Future``. Full precision on one level: :func:`allreduce_flat`
        (one ``all_reduce``, no thread hop). 16 or 8 bits, or two levels: a chunked chain on the stream's
        worker (:mod:`._levels`). PowerSGD: :func:`allreduce_powersgd` around the full-precision
        algorithm of the same hierarchy (its warm-up).

    Example:
        >>> algo = get_algorithm("mixed_fp16", "auto", runtime.global_process_set)
        >>> algo(bucket, ctx).wait()
    """
    if op == ReduceOp.Adasum:
        return allreduce_adasum
    cfg = runtime.config()
    comp = get_compressor(compression)
    ef = bool(getattr(cfg, "error_feedback", False) if error_feedback is None else error_feedback)
    if comp.low_rank:
        return _powersgd(comp, hierarchical, process_set, int(num_streams or cfg.num_streams))
    if use_hierarchical(hierarchical, process_set):
        nodes = StreamNodeGroups(process_set, int(num_streams or cfg.num_streams))
        return functools.partial(allreduce_hierarchical, nodes=nodes,
                                 local_dtype=None if comp.cross_node_only else comp.wire_dtype,
                                 cross_dtype=comp.wire_dtype, error_feedback=ef)
    if comp.wire_dtype is None or (comp.cross_node_only and not _spans_nodes(process_set)):
        return allreduce_flat
    if comp.wire_dtype == torch.int8:
        return allreduce_int8
    sixteen = allreduce_fp16 if comp.wire_dtype == torch.float16 else allreduce_bf16
    return functools.partial(sixteen, error_feedback=ef)


def _powersgd(comp, hierarchical: str, process_set: runtime.ProcessSet, num_streams: int) -> Algorithm:
    """PowerSGD around the full-precision algorithm of the same hierarchy (its warm-up): flat over the
    process set, or, for ``mixed_powersgd`` with hierarchy, after a full-precision sum inside the node."""
    rank, start = comp.param("rank"), comp.param("start_step")
    if use_hierarchical(hierarchical, process_set):
        nodes = StreamNodeGroups(process_set, num_streams)
        fp32 = functools.partial(allreduce_hierarchical, nodes=nodes)
        if comp.cross_node_only:
            return functools.partial(allreduce_powersgd, rank=rank, start_step=start, full_precision=fp32,
                                     node_level=lambda g: nodes.levels(g, None, None)[0],
                                     cross_group=lambda g: nodes.levels(g, None, None)[1].group)
        return functools.partial(allreduce_powersgd, rank=rank, start_step=start, full_precision=fp32)
    if comp.cross_node_only and not _spans_nodes(process_set):
        return allreduce_flat
    return functools.partial(allreduce_powersgd, rank=rank, start_step=start, full_precision=allreduce_flat)


#: Below this size a user allreduce stays one flat ``all_reduce``: two levels pay off on bandwidth, while
#: a small tensor is latency-bound (the chain adds a thread hop and three operations).
_HIERARCHICAL_MIN_NBYTES = 1 << 20

# process-set group -> the user collectives' hierarchical algorithm, or None (flat); see start_allreduce.
_user_algorithms: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _FutureWork:
    """A future seen as a torch ``Work`` (``wait``, ``is_completed``), for :mod:`shoal.core.collectives`."""

    __slots__ = ("_future",)

    def __init__(self, future: torch.futures.Future):
        self._future = future

    def wait(self) -> bool:
        self._future.wait()
        return True

    def is_completed(self) -> bool:
        return self._future.done()


def start_allreduce(buffer: torch.Tensor, process_set: runtime.ProcessSet, op) -> "dist.Work":
    """Start the user collective's allreduce (``shoal.core.collectives``) of ``buffer``, in place.

    Hierarchical when the config's ``hierarchical`` resolves on for ``process_set`` and ``buffer`` is a
    contiguous floating-point sum of at least 1 MiB; otherwise one ``dist.all_reduce`` on the process
    set's group. Full precision either way (user collectives are not compressed). Every member must call
    it with the same size (the collectives' signature check guarantees it): the first hierarchical call
    creates the node groups.

    Returns:
        A torch ``Work`` or an object with its ``wait()`` and ``is_completed()``.
    """
    if (op == dist.ReduceOp.SUM and buffer.is_floating_point() and buffer.is_contiguous()
            and buffer.numel() * buffer.element_size() >= _HIERARCHICAL_MIN_NBYTES):
        group = process_set.group
        if group not in _user_algorithms:
            on = use_hierarchical(runtime.config().hierarchical, process_set)
            _user_algorithms[group] = (get_algorithm("none", "on", process_set, num_streams=1) if on else None)
        algorithm = _user_algorithms[group]
        if algorithm is not None:
            ctx = ReduceContext(group=runtime.stream_groups(process_set, 1)[0], process_set=process_set)
            return _FutureWork(runtime.launch_in_order(ctx.group, lambda: algorithm(buffer.view(-1), ctx)))
    return dist.all_reduce(buffer, op=op, group=process_set.group, async_op=True)


def start_adasum(buffer: torch.Tensor, process_set: runtime.ProcessSet,
                 segments: Optional[list[int]] = None) -> _FutureWork:
    """Adasum of the user collectives (``op=hvd.Adasum``): :func:`allreduce_adasum` of ``buffer`` (flat,
    floating point) on the process set's own group, in the caller's thread; complete when it returns."""
    ctx = ReduceContext(group=process_set.group, process_set=process_set, segments=segments)
    return _FutureWork(allreduce_adasum(buffer.view(-1), ctx))


def _spans_nodes(process_set: runtime.ProcessSet) -> bool:
    lay = runtime.layout()
    return len({lay.node_of(r) for r in process_set.ranks}) > 1
