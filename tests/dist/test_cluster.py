"""The emulated cluster: real namespaces, real tc shaping, real ranks; nothing may be left behind.

Needs root (``ip netns add``); every test is skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shoal.testing.cluster import (
    ClusterError,
    EmulatedCluster,
    check_available,
    cleanup_stale,
    list_namespaces,
    parse_rate,
)

_REASON = check_available()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"emulated cluster unavailable: {_REASON}")

PY = sys.executable


def _ours(prefix: str) -> list[str]:
    return list_namespaces(prefix)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_parse_rate():
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("100mbit") == 1e8
    assert parse_rate("2.5Gbit") == 2.5e9
    assert parse_rate("10mbps") == 8e7  # tc: bps is bytes per second
    with pytest.raises(ValueError, match="HINT"):
        parse_rate("fast")


# Each rank: shoal.init, check that the layout matches the node it was started in, allreduce the
# rank, and time a 2 MB allreduce inside the node (loopback) and across nodes (the shaped link).
_LAYOUT_SCRIPT = textwrap.dedent("""
    import os, socket, time, torch, torch.distributed as dist
    import shoal.core.runtime as rt
    torch.set_num_threads(1)
    rt.init(timeout_s=60)
    node, local = int(os.environ["NODE_RANK"]), int(os.environ["LOCAL_RANK"])
    assert rt.size() == 4, rt.size()
    assert (rt.local_rank(), rt.local_size()) == (local, 2), (rt.local_rank(), rt.local_size())
    assert (rt.cross_rank(), rt.cross_size()) == (node, 2), (rt.cross_rank(), rt.cross_size())
    t = torch.tensor([float(rt.rank())])
    dist.all_reduce(t)
    assert t.item() == 6.0, t
    x = torch.ones(512 * 1024)  # 2 MB
    def timed(group):
        best = 1e9
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter(); dist.all_reduce(x, group=group); best = min(best, time.perf_counter() - t0)
        return best
    local_s, cross_s = timed(rt.local_group()), timed(rt.cross_group())
    print(f"OK rank={rt.rank()} host={socket.gethostname()} local_ms={local_s*1e3:.1f} cross_ms={cross_s*1e3:.1f}")
    rt.shutdown()
""")


@needs_netns
@pytest.mark.timeout(90)
def test_two_nodes_two_ranks_layout_and_shaping():
    with EmulatedCluster(nodes=2, ranks_per_node=2, rate="100mbit") as cluster:
        prefix = cluster.prefix
        assert len(_ours(prefix)) == 3  # switch + 2 nodes
        run = cluster.run([PY, "-c", _LAYOUT_SCRIPT], timeout_s=60)
    assert _ours(prefix) == []
    assert not [d for d in os.listdir("/etc/netns") if d.startswith(prefix)]
    run.check()
    assert "cannot be retrieved" not in run.results[0].output  # node names resolve (hosts files)
    lines = [next(line for line in r.output.splitlines() if line.startswith("OK")) for r in run.results]
    fields = [dict(kv.split("=") for kv in line.split()[1:]) for line in lines]
    # Distinct host name per node (UTS namespaces), shared inside a node.
    hosts = [f["host"] for f in fields]
    if cluster.hostnames_enabled:
        assert hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts
    # The cross-node link is shaped: a 2-rank allreduce of S bytes sends S bytes per rank, so
    # 2 MB at 100 Mbit/s needs >= 168 ms; allow 20% below that for tbf's initial burst.
    # Inside a node it stays on loopback (unshaped): at least 4x faster.
    for f in fields:
        cross_ms, local_ms = float(f["cross_ms"]), float(f["local_ms"])
        assert cross_ms > 0.8 * 2 * 1024 * 1024 * 8 / 100e6 * 1e3, fields
        assert local_ms < cross_ms / 4, fields


@needs_netns
@pytest.mark.timeout(60)
def test_failing_rank_leaves_nothing_behind(tmp_path):
    # Rank 0 leaves a grandchild in a session of its own (out of reach of killpg) and waits;
    # rank 1 fails. The others must be killed after the grace period, the escaped grandchild too.
    pidfile = tmp_path / "escaped.pid"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        if os.environ["RANK"] == "1":
            print("rank 1 failing on purpose"); sys.exit(1)
        if os.environ["RANK"] == "0":
            p = subprocess.Popen(["sleep", "600"], start_new_session=True)
            open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(600)
    """)
    with EmulatedCluster(nodes=2, ranks_per_node=2, rate="1gbit") as cluster:
        prefix = cluster.prefix
        t0 = time.monotonic()
        run = cluster.run([PY, "-c", script], timeout_s=30, grace_s=1.0)
        assert time.monotonic() - t0 < 15
    assert _ours(prefix) == []
    assert not run.ok and not run.timed_out
    assert run.results[1].returncode == 1 and not run.results[1].killed
    assert "failing on purpose" in run.results[1].output
    assert all(run.results[r].killed for r in (0, 2, 3))
    assert "rank 1 (node 0, local rank 1): exit 1" in run.describe()
    assert _dead(int(pidfile.read_text()))
    with pytest.raises(AssertionError, match="failing on purpose"):
        run.check()


@needs_netns
@pytest.mark.timeout(60)
def test_timeout_leaves_nothing_behind():
    with EmulatedCluster(nodes=2, ranks_per_node=1, rate=None) as cluster:
        prefix = cluster.prefix
        run = cluster.run(["sleep", "600"], timeout_s=1.0)
    assert run.timed_out and not run.ok
    assert all(r.killed and r.returncode == -signal.SIGTERM for r in run.results)
    assert run.elapsed_s < 10
    assert _ours(prefix) == []


@needs_netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_to_the_cli_removes_everything(sig):
    # SIGINT may be inherited as ignored (a background job of a script); give the CLI the default.
    proc = subprocess.Popen([PY, "-m", "shoal.testing.cluster", "--nodes", "2", "--", "sleep", "600"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    prefix = f"shoal-{proc.pid}-"
    try:
        deadline = time.monotonic() + 20
        while len(_ours(prefix)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_ours(prefix)) == 3
        time.sleep(0.5)  # let it start the ranks
        proc.send_signal(sig)
        assert proc.wait(20) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _ours(prefix) == []


@needs_netns
def test_cleanup_stale_removes_dead_runs_only():
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"shoal-{gone.pid}-0-n0"
    live = f"shoal-{os.getpid()}-999-n0"
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True)
        orphan = f"/etc/netns/shoal-{gone.pid}-1-n0"  # a hosts file whose namespace is gone
        os.makedirs(orphan, exist_ok=True)
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert _ours(stale) == [] and _ours(live) == [live]
        assert not os.path.exists(orphan)
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_netns
def test_delay_works_or_says_netem_is_missing():
    try:
        with EmulatedCluster(nodes=2, rate="1gbit", delay_ms=1) as cluster:
            prefix = cluster.prefix
            cluster.run(["true"], timeout_s=10).check()
    except ClusterError as exc:
        assert "netem" in str(exc) and "HINT" in str(exc)
        prefix = f"shoal-{os.getpid()}-"
    assert not [ns for ns in _ours(prefix)]
