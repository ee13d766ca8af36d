"""Which ranks share a node, as pure functions over the list of every rank's host name.

The runtime (``shoal.core.runtime``) gathers host names once at ``init`` and builds the process groups
from the :class:`Layout` computed here; algorithms ask the layout, never the environment.

Glossary:
    node        ranks that share fast links (one host, or a group forced by ``local_size``)
    local rank  index of a rank inside its node; local size: ranks in that node
    cross rank  index of the rank's node; cross size: number of nodes
    cross group ranks with the same local rank, one per node (the ranks that talk across nodes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Layout", "compute_layout"]


@dataclass(frozen=True, slots=True)
class Layout:
    """The node structure of a world of ranks (identical on every rank)."""

    #: ``nodes[i]`` is the list of global ranks on node ``i``, ascending.
    nodes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(len(n) for n in self.nodes)

    def node_of(self, rank: int) -> int:
        for i, node in enumerate(self.nodes):
            if rank in node:
                return i
        raise ValueError(f"rank {rank} is in no node of {self.nodes}")

    def local_rank(self, rank: int) -> int:
        return self.nodes[self.node_of(rank)].index(rank)

    def local_size(self, rank: int) -> int:
        return len(self.nodes[self.node_of(rank)])

    def cross_rank(self, rank: int) -> int:
        """Index of this rank inside its cross group (= its node's index among nodes holding
        its local rank; equal to the node index when the layout is homogeneous)."""
        return self.cross_groups()[self.local_rank(rank)].index(rank)

    def cross_size(self, rank: int) -> int:
        return len(self.cross_groups()[self.local_rank(rank)])

    @property
    def is_homogeneous(self) -> bool:
        """True when every node has the same number of ranks."""
        return len({len(n) for n in self.nodes}) == 1

    def cross_groups(self) -> list[tuple[int, ...]]:
        """``cross_groups()[j]``: ranks with local rank ``j``, one per node that has one."""
        width = max(len(n) for n in self.nodes)
        return [tuple(n[j] for n in self.nodes if j < len(n)) for j in range(width)]


def compute_layout(hosts: Sequence[str], local_size: Optional[int] = None) -> Layout:
    """Group ranks into nodes.

    Args:
        hosts: ``hosts[r]`` is the host name of rank ``r``.
        local_size: override; consecutive ranks form nodes of this size (the last may be smaller),
            so that one machine can emulate several nodes.

    Returns:
        The layout; nodes ordered by their lowest rank.

    Example:
        >>> compute_layout(["a", "a", "b", "b"]).nodes
        ((0, 1), (2, 3))
        >>> compute_layout(["a"] * 4, local_size=2).nodes
        ((0, 1), (2, 3))
    """
    n = len(hosts)
    if n == 0:
        raise ValueError("compute_layout: empty world")
    if local_size is not None:
        if local_size < 1:
            raise ValueError(f"local_size must be >= 1, got {local_size}")
        return Layout(tuple(tuple(range(i, min(i + local_size, n))) for i in range(0, n, local_size)))
    order: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        order.setdefault(host, []).append(rank)
    return Layout(tuple(tuple(ranks) for ranks in order.values()))
