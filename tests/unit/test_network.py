"""Network detection and the gloo/NCCL settings chosen from it, on fake sysfs trees.

The trees live in tests/fixtures/sysfs (see its README); addresses are given here. Expected NCCL
settings follow the NCCL user guide, "Environment Variables" chapter:
NCCL_SOCKET_IFNAME ("=" for exact names), NCCL_IB_HCA (exact ``=dev:port`` list),
NCCL_IB_GID_INDEX (RoCE only; the RoCE v2 IPv4-mapped entry, what NCCL >= 2.21 auto-selects),
NCCL_IB_DISABLE (no usable IB/RoCE port).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.core.config import ShoalConfig
from shoal.core.env import WorldInfo
from shoal.core.network import (Gid, Interface, RdmaPort, configure, parse_ip_addr_json,
                                plan_for_this_host, plan_network, rank_interfaces, read_interfaces,
                                read_rdma_ports)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"

ADDRESSES = {
    "ib": {"lo": ["127.0.0.1", "::1"], "eth0": ["10.1.0.5"], "ib0": ["10.2.0.5", "fe80::1"],
           "docker0": ["172.17.0.1"], "veth1a2b3c": []},
    "roce": {"lo": ["127.0.0.1"], "eth0": ["10.1.0.6"], "ens1f0": ["192.168.10.6"],
             "ens1f1": ["192.168.11.6"]},
    "down": {"lo": ["127.0.0.1"], "eth0": ["10.1.0.7"]},
    "none": {"lo": ["127.0.0.1"], "eth0": ["10.1.0.8", "fe80::8"], "eth1": ["127.0.1.1"],
             "eth2": [], "docker0": ["172.17.0.1"], "veth9f8e7d": []},
}

#: Rank 8 of 16, 8 ranks per host: ranks on other hosts (torchrun with --nnodes=2).
MULTI = WorldInfo(8, 16, 0, 8, "env://", "10.1.0.1", 29500, "torchrun")
#: The test harness: every rank on this host, FileStore rendezvous.
LOCAL = WorldInfo(1, 2, 1, 2, "file:///tmp/store", None, None, "file")
SINGLE = WorldInfo(0, 1, 0, 1, None, None, None, "single")


def _tree(name: str) -> tuple[list[Interface], list[RdmaPort]]:
    root = str(FIXTURES / name)
    return read_interfaces(root, addresses=ADDRESSES[name]), read_rdma_ports(root)


def _plan(tree: str, *, world: WorldInfo = MULTI, backend: str = "nccl", **kw):
    interfaces, ports = _tree(tree)
    kw.setdefault("environ", {})
    return plan_network(world=world, interfaces=interfaces, rdma_ports=ports, backend=backend, **kw)


def _values(plan) -> dict[str, str]:
    return {name: value for name, (value, _reason) in plan.env.items()}


@pytest.fixture
def restore_environ():
    """configure() writes os.environ (that is its job): put it back exactly afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ------------------------------------------------------------------------------ readers

def test_read_rdma_ports_ib_tree():
    ports = read_rdma_ports(str(FIXTURES / "ib"))
    assert [(p.name, p.state, p.link_layer) for p in ports] == [
        ("mlx5_0:1", "ACTIVE", "InfiniBand"), ("mlx5_1:1", "DOWN", "InfiniBand")]
    assert ports[0].rate == "200 Gb/sec (4X HDR)"
    # The all-zero entries that fill a GID table are dropped; IB GIDs have no RoCE type.
    assert [(g.index, g.roce_type) for g in ports[0].gids] == [(0, None)]
    assert ports[0].roce_v2_ipv4_gid() is None


def test_read_rdma_ports_roce_tree_finds_roce_v2_ipv4_gid():
    ports = read_rdma_ports(str(FIXTURES / "roce"))
    assert [p.is_roce for p in ports] == [True, True]
    types = [(g.index, g.roce_type, g.ipv4) for g in ports[0].gids]
    assert types == [(0, "IB/RoCE v1", None), (1, "RoCE v2", None),
                     (2, "IB/RoCE v1", "192.168.10.6"), (3, "RoCE v2", "192.168.10.6")]
    gid = ports[1].roce_v2_ipv4_gid()
    assert (gid.index, gid.ipv4, gid.netdev) == (3, "192.168.11.6", "ens1f1")


def test_read_rdma_ports_without_rdma_is_empty():
    assert read_rdma_ports(str(FIXTURES / "none")) == []
    assert read_rdma_ports(str(FIXTURES / "does-not-exist")) == []


def test_read_interfaces_flags_speed_and_loopback():
    by_name = {i.name: i for i in _tree("none")[0]}
    assert by_name["lo"].is_loopback and by_name["lo"].resolves_to_loopback
    assert by_name["eth0"].speed_mbps is None          # virtio: no speed reported
    assert by_name["veth9f8e7d"].speed_mbps == 10000
    assert not by_name["eth2"].is_up                    # flags 0x1002: administratively down
    assert not by_name["eth1"].is_loopback and by_name["eth1"].resolves_to_loopback
    assert by_name["docker0"].is_container_or_virtual and by_name["veth9f8e7d"].is_container_or_virtual
    assert by_name["eth0"].routable_addresses == ("10.1.0.8",)   # link-local fe80:: left out


def test_parse_ip_addr_json():
    text = ('[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"}]},'
            '{"ifindex":2,"ifname":"ifb0","addr_info":[]},'
            '{"ifindex":4,"ifname":"eth0","addr_info":[{"family":"inet","local":"192.0.2.2"},'
            '{"family":"inet","local":"192.0.2.9","label":"eth0:1"},{"family":"inet6","local":"fd00::2"}]}]')
    assert parse_ip_addr_json(text) == {"lo": ["127.0.0.1"], "ifb0": [],
                                        "eth0": ["192.0.2.2", "192.0.2.9", "fd00::2"]}
    assert parse_ip_addr_json("not json") is None and parse_ip_addr_json("{}") is None


def test_gid_parsing():
    assert Gid(3, "0000:0000:0000:0000:0000:ffff:0a00:0005").ipv4 == "10.0.0.5"
    assert Gid(0, "fe80:0000:0000:0000:b8ce:f603:00a1:b2c4").ipv4 is None
    assert not Gid(9, "0000:0000:0000:0000:0000:0000:0000:0000").is_valid
    assert Gid(1, "fe80::1", "RoCE v2").is_roce_v2


def test_rank_interfaces_avoids_loopback_down_and_containers():
    assert [i.name for i in rank_interfaces(_tree("none")[0])] == ["eth0", "docker0"]
    # NCCL's default favours ib* (env docs, NCCL_SOCKET_IFNAME); then speed.
    assert [i.name for i in rank_interfaces(_tree("ib")[0])] == ["ib0", "eth0", "docker0"]
    assert [i.name for i in rank_interfaces(_tree("roce")[0])] == ["ens1f0", "ens1f1", "eth0"]


# ------------------------------------------------------------------------------ NCCL choices

def test_infiniband_active_and_down_port():
    plan = _plan("ib", route_source_ip="10.2.0.5")
    assert _values(plan) == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "=ib0",
                             "NCCL_IB_HCA": "=mlx5_0:1"}
    assert "mlx5_1:1 (DOWN)" in plan.env["NCCL_IB_HCA"][1]
    assert plan.transport == "InfiniBand" and plan.warnings == []


def test_roce_v2_picks_ipv4_gid_index():
    plan = _plan("roce", route_source_ip="10.1.0.6")
    assert _values(plan) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth0",
                             "NCCL_IB_GID_INDEX": "3"}
    assert "192.168.10.6" in plan.env["NCCL_IB_GID_INDEX"][1]
    assert plan.transport == "RoCE" and plan.warnings == []


def test_roce_user_steering_of_gid_selection_is_respected():
    plan = _plan("roce", environ={"NCCL_IB_ADDR_FAMILY": "AF_INET6"})
    assert "NCCL_IB_GID_INDEX" not in plan.env
    assert any("NCCL_IB_ADDR_FAMILY" in n for n in plan.notes)


def _roce_port(device: str, v2_ipv4_index: int | None, netdev: str = "ens1") -> RdmaPort:
    gids = [Gid(0, "fe80::1", "IB/RoCE v1", netdev), Gid(1, "fe80::1", "RoCE v2", netdev)]
    if v2_ipv4_index is not None:
        gids.append(Gid(v2_ipv4_index, "::ffff:10.9.0.1", "RoCE v2", netdev))
    return RdmaPort(device, 1, "ACTIVE", "Ethernet", "100 Gb/sec", tuple(gids))


def test_roce_ports_that_disagree_on_gid_index_leave_it_to_nccl():
    eth0 = Interface("eth0", ("10.1.0.9",))
    ports = [_roce_port("mlx5_0", 3), _roce_port("mlx5_1", 5)]
    plan = plan_network(world=MULTI, interfaces=[eth0], rdma_ports=ports, backend="nccl",
                        environ={}, nccl_version=(2, 20, 5))
    assert "NCCL_IB_GID_INDEX" not in plan.env
    assert len(plan.warnings) == 1 and "[3, 5]" in plan.warnings[0] and "HINT" in plan.warnings[0]


def test_roce_port_without_ipv4_gid_is_left_out_or_warned():
    eth0 = Interface("eth0", ("10.1.0.9",))
    plan = plan_network(world=MULTI, interfaces=[eth0], backend="nccl", environ={},
                        rdma_ports=[_roce_port("mlx5_0", 3), _roce_port("mlx5_1", None)])
    assert _values(plan)["NCCL_IB_HCA"] == "=mlx5_0:1"
    assert _values(plan)["NCCL_IB_GID_INDEX"] == "3"
    only_lacking = plan_network(world=MULTI, interfaces=[eth0], backend="nccl", environ={},
                                rdma_ports=[_roce_port("mlx5_1", None, "ens9")])
    assert "NCCL_IB_HCA" not in only_lacking.env and "NCCL_IB_GID_INDEX" not in only_lacking.env
    assert any("no RoCE v2 GID" in w and "ens9" in w for w in only_lacking.warnings)


def test_infiniband_preferred_over_roce_on_a_mixed_host():
    ib = RdmaPort("mlx5_0", 1, "ACTIVE", "InfiniBand", "400 Gb/sec", (Gid(0, "fe80::2"),))
    plan = plan_network(world=MULTI, interfaces=[Interface("eth0", ("10.1.0.9",))], backend="nccl",
                        environ={}, rdma_ports=[ib, _roce_port("mlx5_1", 3)])
    assert _values(plan)["NCCL_IB_HCA"] == "=mlx5_0:1"
    assert "NCCL_IB_GID_INDEX" not in plan.env and plan.transport == "InfiniBand"


def test_rdma_present_but_no_active_port_disables_ib_with_a_warning():
    plan = _plan("down")
    assert _values(plan)["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_HCA" not in plan.env
    assert len(plan.warnings) == 1
    assert "mlx5_0:1 DOWN" in plan.warnings[0] and "mlx5_0:2 INIT" in plan.warnings[0]
    assert "HINT" in plan.warnings[0] and plan.transport == "sockets"


def test_no_rdma_sets_only_the_socket_interface():
    plan = _plan("none")
    assert _values(plan) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth0"}
    assert plan.transport == "sockets" and plan.warnings == []


def test_user_ib_disable_is_respected():
    plan = _plan("ib", environ={"NCCL_IB_DISABLE": "1"})
    assert not any(k.startswith("NCCL_IB") for k in plan.env)
    assert any("NCCL_IB_DISABLE=1" in n for n in plan.notes)


def test_gloo_backend_gets_no_nccl_variables():
    assert _values(_plan("ib", backend="gloo")) == {"GLOO_SOCKET_IFNAME": "ib0"}


# ------------------------------------------------------------------------------ interface choice

@pytest.mark.parametrize("world", [SINGLE, LOCAL,
                                   WorldInfo(1, 4, None, None, "env://", "127.0.0.1", 29500, "slurm")])
def test_one_host_forces_nothing(world):
    plan = _plan("ib", world=world, master_ips=("127.0.0.1",))
    assert not plan.multi_host and plan.env == {} and plan.interface is None
    assert plan.warnings == []


def test_route_to_the_rendezvous_wins_over_ranking():
    assert _plan("ib", route_source_ip="10.1.0.5").interface == "eth0"


def test_hostname_address_is_used_when_there_is_no_route():
    assert _plan("ib", hostname="node7", hostname_ips=("10.1.0.5",)).interface == "eth0"


def test_hostname_resolving_to_loopback_is_explained():
    plan = _plan("none", hostname="node7", hostname_ips=("127.0.1.1",))
    assert plan.interface == "eth0"          # eth1 holds 127.0.1.1 but resolves to loopback
    assert any("resolves to loopback" in n for n in plan.notes)
    broken = plan_network(world=MULTI, interfaces=[Interface("lo", ("127.0.0.1",), is_loopback=True)],
                          environ={}, hostname="node7", hostname_ips=("127.0.1.1",))
    assert broken.interface is None
    assert any("node7 resolves to loopback" in w for w in broken.warnings)
    assert any("no network interface is up" in w for w in broken.warnings)


def test_requested_interface_is_honoured_even_on_one_host():
    plan = _plan("none", world=LOCAL, requested_interface="eth0")
    assert _values(plan) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth0"}
    assert plan.warnings == []


def test_requested_interface_that_is_missing_or_loopback_warns():
    missing = _plan("none", requested_interface="ens5")
    assert any("ens5" in w and "does not have" in w for w in missing.warnings)
    loop = _plan("none", requested_interface="eth1")
    assert any("loopback" in w for w in loop.warnings)


def test_rendezvous_on_any_address_warns_only_across_hosts():
    multi = WorldInfo(0, 4, 0, 2, "env://", "0.0.0.0", 29500, "torchrun")
    plan = _plan("none", world=multi, master_ips=("0.0.0.0",))
    assert any("MASTER_ADDR=0.0.0.0" in w and "HINT" in w for w in plan.warnings)
    local = WorldInfo(0, 2, 0, 2, "env://", "0.0.0.0", 29500, "torchrun")
    plan = _plan("none", world=local, master_ips=("0.0.0.0",))
    assert plan.warnings == [] and any("0.0.0.0" in n for n in plan.notes)


def test_loopback_rendezvous_in_a_multi_host_run_warns():
    world = WorldInfo(0, 4, 0, 2, "env://", "localhost", 29500, "torchrun")
    plan = _plan("none", world=world, master_ips=("127.0.0.1",))
    assert plan.multi_host
    assert any("MASTER_ADDR=localhost resolves to loopback" in w for w in plan.warnings)


def test_user_socket_ifname_is_checked():
    plan = _plan("none", environ={"GLOO_SOCKET_IFNAME": "ens5", "NCCL_SOCKET_IFNAME": "eth"})
    assert [w for w in plan.warnings if "GLOO_SOCKET_IFNAME=ens5" in w]
    assert not [w for w in plan.warnings if "NCCL_SOCKET_IFNAME" in w]    # prefix eth matches
    assert _plan("none", environ={"NCCL_SOCKET_IFNAME": "^docker,lo"}).warnings == []
    loop = _plan("none", environ={"GLOO_SOCKET_IFNAME": "lo"})
    assert any("GLOO_SOCKET_IFNAME=lo" in w and "loopback" in w for w in loop.warnings)


# ------------------------------------------------------------------------------ configure()

def test_configure_on_one_host_touches_nothing_and_is_cheap(restore_environ):
    before = dict(os.environ)
    cfg = ShoalConfig(backend="gloo")
    configure(cfg, LOCAL)  # warm-up (imports torch for the backend rule)
    start = time.perf_counter()
    for _ in range(100):
        plan = configure(cfg, LOCAL)
    per_call_ms = (time.perf_counter() - start) * 10
    assert plan.env == {} and dict(os.environ) == before
    # It runs at every init; "a few ms" is the budget, this is usually ~0.05 ms.
    assert per_call_ms < 5, per_call_ms


def test_configure_multi_host_sets_defaults_but_keeps_the_users(restore_environ, caplog):
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX",
                 "NCCL_IB_DISABLE", "NCCL_IB_ADDR_FAMILY", "NCCL_IB_ADDR_RANGE",
                 "NCCL_IB_ROCE_VERSION_NUM"):
        os.environ.pop(name, None)
    os.environ["NCCL_SOCKET_IFNAME"] = "=ib0"
    interfaces, ports = _tree("ib")
    world = WorldInfo(8, 16, 0, 8, "env://", "10.2.0.1", 29500, "torchrun")
    plan = configure(ShoalConfig(backend="nccl"), world, interfaces=interfaces, rdma_ports=ports)
    assert plan.interface == "ib0"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"
    assert os.environ["NCCL_IB_HCA"] == "=mlx5_0:1"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "=ib0"          # the user's, untouched
    os.environ["NCCL_SOCKET_IFNAME"] = "eth0"
    with caplog.at_level(logging.INFO, logger="shoal.core.env"):
        configure(ShoalConfig(backend="nccl"), world, interfaces=interfaces, rdma_ports=ports)
    assert os.environ["NCCL_SOCKET_IFNAME"] == "eth0"          # never overridden...
    kept = [r.getMessage() for r in caplog.records if "keeping your NCCL_SOCKET_IFNAME=eth0" in r.getMessage()]
    assert len(kept) == 1 and "shoal would pick =ib0" in kept[0], kept   # ...and never silently


def test_configure_logs_warnings_once_per_host(restore_environ, caplog):
    os.environ.pop("NCCL_IB_DISABLE", None)
    interfaces, ports = _tree("down")
    world = WorldInfo(8, 16, 0, 8, "env://", "10.1.0.1", 29500, "torchrun")
    with caplog.at_level(logging.WARNING, logger="shoal.core.network"):
        configure(ShoalConfig(backend="nccl"), world, interfaces=interfaces, rdma_ports=ports)
        configure(ShoalConfig(backend="nccl"), WorldInfo(9, 16, 1, 8, "env://", "10.1.0.1", 29500,
                                                         "torchrun"),
                  interfaces=interfaces, rdma_ports=ports)
    assert len([r for r in caplog.records if "no port is ACTIVE" in r.getMessage()]) == 1


def test_plan_for_this_host_reads_the_fake_tree(restore_environ):
    plan = plan_for_this_host(ShoalConfig(backend="nccl"), MULTI, sys_root=str(FIXTURES / "roce"),
                              interfaces=_tree("roce")[0], environ={})
    assert _values(plan)["NCCL_IB_GID_INDEX"] == "3"


def test_importing_network_does_not_import_torch():
    code = "import sys, shoal.core.network; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ the user's NCCL_IB_HCA

def test_user_hca_decides_the_gid_index_on_the_roce_tree():
    # Both ports of the roce tree hold their RoCE v2 IPv4 GID at index 3; the reason names the
    # address of the port the user chose (mlx5_1: 192.168.11.6), not of the one Shoal would pick.
    plan = _plan("roce", route_source_ip="10.1.0.6", environ={"NCCL_IB_HCA": "=mlx5_1:1"})
    assert _values(plan)["NCCL_IB_GID_INDEX"] == "3"
    reason = plan.env["NCCL_IB_GID_INDEX"][1]
    assert "192.168.11.6" in reason and "mlx5_1:1" in reason and "mlx5_0" not in reason
    assert "your NCCL_IB_HCA==mlx5_1:1" in reason
    assert any("your NCCL_IB_HCA==mlx5_1:1 selects mlx5_1:1" in n for n in plan.notes)
    assert plan.transport == "RoCE" and plan.warnings == []


@pytest.mark.parametrize("spec, index", [("mlx5_1", "5"), ("=mlx5_1:1", "5"), ("^mlx5_0", "5"),
                                         ("^=mlx5_1", "3"), ("mlx5_0:1", "3")])
def test_user_hca_on_ports_that_disagree_pins_the_index_of_the_users_port(spec, index):
    # Without NCCL_IB_HCA the two indices disagree and Shoal leaves the variable to NCCL (see
    # test_roce_ports_that_disagree_on_gid_index_leave_it_to_nccl); with it, only the chosen port counts.
    eth0 = Interface("eth0", ("10.1.0.9",))
    plan = plan_network(world=MULTI, interfaces=[eth0], backend="nccl", nccl_version=(2, 20, 5),
                        rdma_ports=[_roce_port("mlx5_0", 3), _roce_port("mlx5_1", 5)],
                        environ={"NCCL_IB_HCA": spec})
    assert _values(plan)["NCCL_IB_GID_INDEX"] == index
    assert plan.warnings == []


def test_user_hca_picking_roce_on_a_mixed_host_gets_the_roce_gid_index():
    # Shoal alone would prefer InfiniBand and set no GID index; the user chose the RoCE port, so
    # NCCL will use RoCE there and needs the RoCE v2 IPv4 entry.
    ib = RdmaPort("mlx5_0", 1, "ACTIVE", "InfiniBand", "400 Gb/sec", (Gid(0, "fe80::2"),))
    plan = plan_network(world=MULTI, interfaces=[Interface("eth0", ("10.1.0.9",))], backend="nccl",
                        environ={"NCCL_IB_HCA": "=mlx5_1"}, rdma_ports=[ib, _roce_port("mlx5_1", 3)])
    assert _values(plan)["NCCL_IB_HCA"] == "=mlx5_0:1"        # what Shoal would pick (kept: the user's wins)
    assert _values(plan)["NCCL_IB_GID_INDEX"] == "3" and plan.transport == "RoCE"


def test_user_hca_without_an_ipv4_gid_or_an_active_port_warns():
    eth0 = Interface("eth0", ("10.1.0.9",))
    ports = [_roce_port("mlx5_0", 3), _roce_port("mlx5_1", None, "ens9")]
    lacking = plan_network(world=MULTI, interfaces=[eth0], backend="nccl", rdma_ports=ports,
                           environ={"NCCL_IB_HCA": "mlx5_1"})
    assert "NCCL_IB_GID_INDEX" not in lacking.env
    assert any("mlx5_1:1" in w and "ens9" in w and "NCCL_IB_HCA=mlx5_1" in w and "HINT" in w
               for w in lacking.warnings)
    nothing = _plan("ib", environ={"NCCL_IB_HCA": "=mlx5_1"})       # mlx5_1:1 is DOWN in the ib tree
    assert nothing.transport == "sockets" and "NCCL_IB_GID_INDEX" not in nothing.env
    [w] = nothing.warnings
    assert "selects no ACTIVE RDMA port" in w and "mlx5_1:1 DOWN" in w and "'=mlx5_0:1'" in w


def test_configure_keeps_the_users_hca_and_logs_it(restore_environ, caplog):
    for name in ("NCCL_IB_GID_INDEX", "NCCL_IB_DISABLE", "NCCL_IB_ADDR_FAMILY", "NCCL_IB_ADDR_RANGE",
                 "NCCL_IB_ROCE_VERSION_NUM", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        os.environ.pop(name, None)
    os.environ["NCCL_IB_HCA"] = "=mlx5_1"
    ports = [_roce_port("mlx5_0", 3), _roce_port("mlx5_1", 5), _roce_port("mlx5_2", None)]
    with caplog.at_level(logging.INFO, logger="shoal.core.env"):
        configure(ShoalConfig(backend="nccl"), MULTI, interfaces=[Interface("eth0", ("10.1.0.9",))],
                  rdma_ports=ports, environ=None)
    assert os.environ["NCCL_IB_HCA"] == "=mlx5_1"              # the user's, untouched
    assert os.environ["NCCL_IB_GID_INDEX"] == "5"              # the index of the user's port
    kept = [r.getMessage() for r in caplog.records if "keeping your NCCL_IB_HCA==mlx5_1" in r.getMessage()]
    assert len(kept) == 1 and "=mlx5_0:1,mlx5_1:1" in kept[0], kept
