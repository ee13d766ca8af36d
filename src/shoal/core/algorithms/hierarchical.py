"""Hierarchical (two-level) allreduce: reduce-scatter inside the node, allreduce of the shard across
nodes, allgather inside the node.

Design constraints:

1. Every rank of a node uses the slow link at once, each for 1/G of the bucket: local rank j reduces
   shard j across nodes on cross group j, and all G cross groups run concurrently. A node then sends
   the bucket once per allreduce, where a flat ring over all ranks sends it 2(N-1)/N times through the
   node's busiest link (see docs/compression.md for the 2 x 2 arithmetic and measurements).
2. Pipelined: the bucket is cut into chunks (:mod:`._pipeline`), so the node-local stages of chunk k+1
   run while chunk k is on the cross-node wire; measured stage by stage here (2 nodes x 2 ranks, 100 MB,
   1 Gbit/s): local reduce-scatter 656 ms, cross allreduce 831 ms, local allgather 579 ms on a loaded
   2-core machine, so unpipelined the two-level algorithm would lose to the flat one (1297 ms).
3. Each stream has its own local and cross groups (:func:`shoal.core.runtime.stream_node_groups`), so
   buckets in flight on different streams do not serialize on one communicator.
4. Only for layouts where it is defined: every node runs the same number of ranks, and the process set
   is the whole world (groups cannot be created for a subset on its members alone). Otherwise
   :func:`use_hierarchical` says no and the caller uses the flat algorithm.
5. Compression composes: 16 or 8 bits inside and across nodes (``fp16``/``bf16``/``int8``), or full
   precision inside the node and 16 or 8 bits across (``mixed_*``); the cross stage's sum is accumulated
   in float32. With 8 bits, what follows the bucket's last tensor travels in full precision
   (:func:`.compressed.exact_tail`). PowerSGD composes in :mod:`.powersgd`.

What lives elsewhere: the chain runner (:mod:`._levels`), worker threads and chunk schedule
(:mod:`._pipeline`), the layout (:mod:`shoal.core.topology`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import runtime
from ..errors import ShoalError
from ._levels import Level, make_level, reduce_chain, scale_factors
from .compressed import exact_tail
from ._pipeline import worker_for

__all__ = ["StreamNodeGroups", "allreduce_hierarchical", "use_hierarchical"]

log = logging.getLogger(__name__)


def use_hierarchical(setting: str, process_set: runtime.ProcessSet) -> bool:
    """Resolve the ``hierarchical`` knob for ``process_set``: the same answer on every rank.

    ``auto``: on when there is more than one node, every node has the same number of ranks, and that
    number is above 1. ``on``: on unless the layout makes it undefined (uneven nodes, a process set
    that is not the world), in which case the flat algorithm is used and a log line says why.
    ``off``: never.
    """
    if setting == "off":
        return False
    lay = runtime.layout()
    nodes, per_node = len(lay.nodes), len(lay.nodes[0])
    whole_world = process_set.ranks == tuple(range(lay.size))
    if setting == "auto":
        return whole_world and nodes > 1 and lay.is_homogeneous and per_node > 1
    if setting != "on":
        raise ValueError(f"shoal: hierarchical={setting!r} is not one of auto, on, off "
                         "(HINT: check SHOAL_HIERARCHICAL)")
    why = None
    if not lay.is_homogeneous:
        why = f"nodes run different numbers of ranks ({[len(n) for n in lay.nodes]})"
    elif not whole_world:
        why = f"process set {list(process_set.ranks)} is not the whole world"
    if why:
        if runtime.rank() == process_set.ranks[0]:
            log.info("shoal: hierarchical=on but %s: using the flat allreduce", why)
        return False
    return True


class StreamNodeGroups:
    """Maps each stream's group to that stream's ``(local, cross)`` groups (constraint 3).

    Build it on every rank in the same order (it creates process groups on first use).
    """

    def __init__(self, process_set: runtime.ProcessSet, num_streams: int):
        streams = runtime.stream_groups(process_set, num_streams)
        nodes = runtime.stream_node_groups(num_streams)
        self._by_stream = {id(s): pair for s, pair in zip(streams, nodes)}
        self._keep = streams  # keeps ids valid
        self._levels: dict = {}

    def levels(self, stream_group, local_dtype: Optional[torch.dtype],
               cross_dtype: Optional[torch.dtype]) -> tuple[Level, Level]:
        """The stream's ``(local, cross)`` levels with these wire dtypes (cached)."""
        key = (id(stream_group), local_dtype, cross_dtype)
        pair = self._levels.get(key)
        if pair is None:
            local, cross = self._groups(stream_group)
            pair = (make_level(local, local_dtype), make_level(cross, cross_dtype))
            self._levels[key] = pair
        return pair

    def _groups(self, stream_group) -> tuple:
        pair = self._by_stream.get(id(stream_group))
        if pair is None:
            raise ShoalError(
                f"shoal: hierarchical allreduce got a process group that is not one of the "
                f"{len(self._by_stream)} stream groups it was built for on rank {runtime.rank()}. HINT: "
                "build the algorithm with get_algorithm(..., num_streams=N) for the same N as the caller.")
        return pair


def allreduce_hierarchical(buffer: torch.Tensor, ctx, *, nodes: StreamNodeGroups,
                           local_dtype: Optional[torch.dtype] = None, cross_dtype: Optional[torch.dtype] = None,
                           error_feedback: bool = False) -> torch.futures.Future:
    """Sum ``buffer`` over the world in two levels, in place; scale as ``ctx`` says.

    Args:
        buffer: a flat bucket.
        ctx: a :class:`~shoal.core.algorithms.ReduceContext`; ``ctx.group`` picks the stream.
        nodes: the per-stream node groups (:class:`StreamNodeGroups`).
        local_dtype / cross_dtype: wire dtype inside / across nodes: float16, bfloat16, int8 (8-bit
            blocks, error feedback always on), or None (full precision).
        error_feedback: keep and re-add what each 16-bit rounding drops.

    Returns:
        A future whose value is ``buffer``.
    """
    local, cross = nodes.levels(ctx.group, local_dtype, cross_dtype)
    levels = [local, cross]
    compressed = local_dtype is not None or cross_dtype is not None
    before, after = scale_factors(ctx.prescale, ctx.postscale, ctx.process_set.size(), compressed)
    worker = worker_for(ctx.group)
    state = ctx.state
    if torch.int8 in (local_dtype, cross_dtype):
        return worker.submit(lambda: exact_tail(buffer, ctx, lambda part: reduce_chain(
            part, levels, before, after, state, worker, True)))
    return worker.submit(lambda: reduce_chain(buffer, levels, before, after, state, worker, error_feedback))
