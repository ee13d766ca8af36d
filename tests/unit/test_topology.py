"""compute_layout and Layout: node grouping from host names, the local_size override, uneven nodes and
cross groups. Pure functions: no process group."""

from __future__ import annotations

import pytest

from shoal.core.topology import Layout, compute_layout


def test_groups_ranks_by_host_in_rank_order():
    lay = compute_layout(["a", "a", "b", "b"])
    assert lay.nodes == ((0, 1), (2, 3))
    assert lay.size == 4 and lay.is_homogeneous
    assert [lay.local_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [lay.local_size(r) for r in range(4)] == [2, 2, 2, 2]
    assert [lay.cross_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [lay.cross_size(r) for r in range(4)] == [2, 2, 2, 2]
    assert lay.cross_groups() == [(0, 2), (1, 3)]


def test_interleaved_hosts():
    # A launcher that deals ranks round-robin over hosts.
    lay = compute_layout(["a", "b", "a", "b", "a", "b"])
    assert lay.nodes == ((0, 2, 4), (1, 3, 5))
    assert lay.node_of(3) == 1 and lay.local_rank(3) == 1
    assert lay.cross_groups() == [(0, 1), (2, 3), (4, 5)]


def test_single_host_and_single_rank():
    assert compute_layout(["h"] * 3).nodes == ((0, 1, 2),)
    one = compute_layout(["h"])
    assert one.nodes == ((0,),) and one.cross_groups() == [(0,)]
    assert one.local_rank(0) == 0 and one.cross_size(0) == 1


def test_local_size_override_emulates_nodes_on_one_machine():
    lay = compute_layout(["same"] * 4, local_size=2)
    assert lay.nodes == ((0, 1), (2, 3)) and lay.is_homogeneous
    assert [lay.cross_rank(r) for r in range(4)] == [0, 0, 1, 1]
    # The override wins over real host names too.
    assert compute_layout(["a", "b", "c", "d"], local_size=2).nodes == ((0, 1), (2, 3))
    assert compute_layout(["x"] * 4, local_size=1).nodes == ((0,), (1,), (2,), (3,))


def test_uneven_nodes_and_their_cross_groups():
    lay = compute_layout(["a", "a", "a", "b"])
    assert lay.nodes == ((0, 1, 2), (3,)) and not lay.is_homogeneous
    assert lay.cross_groups() == [(0, 3), (1,), (2,)]
    assert lay.cross_size(0) == 2 and lay.cross_size(1) == 1
    assert lay.cross_rank(3) == 1 and lay.cross_rank(2) == 0
    # The last node of an override can be smaller.
    over = compute_layout(["x"] * 5, local_size=2)
    assert over.nodes == ((0, 1), (2, 3), (4,)) and not over.is_homogeneous
    assert over.cross_groups() == [(0, 2, 4), (1, 3)]
    assert over.local_size(4) == 1 and over.cross_rank(4) == 2


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="empty world"):
        compute_layout([])
    with pytest.raises(ValueError, match="local_size must be >= 1"):
        compute_layout(["a"], local_size=0)
    with pytest.raises(ValueError, match="rank 7"):
        Layout(((0, 1),)).node_of(7)
