"""Acceptance tests of ``shoal run``: the real command, real workers, real torch.distributed groups.

Every run goes through ``run_cli`` (conftest.py): own session, deadline, nothing left running.
"""

from __future__ import annotations

import os
import re
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

_INIT = "import shoal.torch as hvd; hvd.init(); "


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_two_ranks_print_rank_and_size(run_cli):
    r = run_cli(["run", "-np", "2", "python", "-c", _INIT + "print(hvd.rank(), hvd.size())"])
    assert r.returncode == 0, r.describe()
    lines = set(r.stdout.splitlines())
    assert {"[rank0]: 0 2", "[rank1]: 1 2"} <= lines, r.describe()


def test_local_size_flag_gives_two_nodes_of_two(run_cli):
    code = _INIT + ("print('layout', hvd.rank(), hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), "
                    "hvd.cross_size())")
    r = run_cli(["run", "-np", "4", "--local-size", "2", "python", "-c", code])
    assert r.returncode == 0, r.describe()
    got = sorted(tuple(int(x) for x in ln.split("layout ")[1].split())
                 for ln in r.stdout.splitlines() if "layout" in ln)
    # rank, local_rank, local_size, cross_rank, cross_size
    assert got == [(0, 0, 2, 0, 2), (1, 1, 2, 0, 2), (2, 0, 2, 1, 2), (3, 1, 2, 1, 2)], r.describe()


def test_rank_exception_fails_the_run_and_is_reported_first(run_cli, tmp_path):
    script = _script(tmp_path, """
        import time
        import torch.distributed as dist
        import shoal.torch as hvd
        hvd.init()
        if hvd.rank() == 1:
            raise ValueError("rank one broke on purpose")
        dist.barrier()  # rank 0 waits for a peer that is gone
    """)
    r = run_cli(["run", "-np", "2", "python", script])
    assert r.returncode == 1, r.describe()
    report = r.shoal_lines()
    assert report and report[0] == "shoal: rank 1 failed: ValueError: rank one broke on purpose", r.describe()
    # The worker's own traceback is there too, under its rank's prefix, starting at user code.
    assert "[rank1]: ValueError: rank one broke on purpose" in r.stderr
    assert "[rank1]:   File \"%s\", line 7, in <module>" % script in r.stderr, r.describe()


def test_rank_killed_by_sigkill_ends_the_run_within_30s(run_cli, tmp_path):
    script = _script(tmp_path, """
        import os, time
        import shoal.torch as hvd
        hvd.init()
        if hvd.rank() == 1:
            print("dying at", time.time(), flush=True)
            os.kill(os.getpid(), 9)
        time.sleep(300)  # only the launcher can end rank 0 in time
    """)
    r = run_cli(["run", "-np", "2", "python", script], timeout_s=90)
    died_at = float(re.search(r"\[rank1\]: dying at (\S+)", r.stdout).group(1))
    assert r.returncode == 128 + 9, r.describe()
    assert r.shoal_lines()[0] == "shoal: rank 1 failed: killed by SIGKILL (signal 9)", r.describe()
    assert r.ended_at - died_at < 30, f"launcher took {r.ended_at - died_at:.1f} s\n{r.describe()}"


@pytest.mark.parametrize("flags, expected", [
    (["--num-streams", "0"], "num_streams must be >= 1"),
    (["--compression", "zip"], "argument --compression: invalid choice: 'zip'"),
    (["--fusion-threshold-mb", "big"], "argument --fusion-threshold-mb: invalid float value: 'big'"),
    (["-H", "a:0"], "slots must be a positive integer"),
    (["-H", "a:1,b:1", "-np", "3"], "-np 3 but the hosts have 2 slots"),
])
def test_bad_flag_value_is_a_clear_usage_error(run_cli, flags, expected):
    np_flags = [] if "-np" in flags else ["-np", "2"]
    r = run_cli(["run", *np_flags, *flags, "python", "-c", "print('never runs')"], timeout_s=30)
    assert r.returncode == 2, r.describe()
    assert expected in r.stderr and "never runs" not in r.stdout, r.describe()


def test_command_not_found_is_a_usage_error(run_cli):
    r = run_cli(["run", "-np", "2", "no-such-program-xyz"], timeout_s=30)
    assert r.returncode == 2 and "command not found: 'no-such-program-xyz'" in r.stderr, r.describe()


def test_knob_flags_reach_workers_and_beat_the_shell(run_cli):
    code = ("import os; print('env', os.environ.get('SHOAL_AUTOTUNE'), "
            "os.environ.get('SHOAL_FUSION_THRESHOLD_MB'), os.environ.get('SHOAL_COMPRESSION'), "
            "os.environ.get('EXTRA'))")
    r = run_cli(["run", "-np", "1", "--no-autotune", "--fusion-threshold-mb", "3", "-x", "EXTRA=yes",
                 "python", "-c", code], env={"SHOAL_AUTOTUNE": "true"})
    assert r.returncode == 0, r.describe()
    # A flag beats the shell's value; a knob without a flag stays unset.
    assert "[rank0]: env false 3.0 None yes" in r.stdout, r.describe()


def test_non_python_command_failure_uses_its_last_stderr_line(run_cli):
    r = run_cli(["run", "-np", "2", "sh", "-c",
                 'if [ "$RANK" = 1 ]; then echo "disk full" >&2; exit 3; fi; sleep 30'])
    assert r.returncode == 3, r.describe()
    assert r.shoal_lines()[0] == "shoal: rank 1 failed: exit code 3: disk full", r.describe()


def test_ctrl_c_stops_every_rank(run_cli, tmp_path):
    script = _script(tmp_path, """
        import time
        print("ready", flush=True)
        time.sleep(300)
    """)
    r = run_cli(["run", "-np", "2", "python", script], timeout_s=60, interrupt_on="ready")
    assert r.returncode == 130, r.describe()  # run_cli also checks that nothing is left running


# --------------------------------------------------------------------------- several hosts


@pytest.fixture(name="two_hosts")
def _two_hosts():
    """Two network namespaces joined by a link: hosts for ``--remote-command 'ip netns exec {host}'``."""
    from shoal.testing.cluster import EmulatedCluster, check_available

    reason = check_available()
    if reason:
        pytest.skip(f"cannot create network namespaces here ({reason}); the multi-host launch "
                    "needs `ip netns add` (root or CAP_NET_ADMIN)")
    cluster = EmulatedCluster(nodes=2, ranks_per_node=1, rate=None, hostnames=False)
    with cluster:  # removes the namespaces however the test ends
        yield cluster


def _hosts_args(cluster, slots: int) -> list[str]:
    return ["-H", ",".join(f"{ns}:{slots}" for ns in cluster.node_ns),
            "--remote-command", "ip netns exec {host}", "--master-addr", cluster.addresses[0],
            "-x", f"GLOO_SOCKET_IFNAME={cluster.interface}"]


def test_two_hosts_in_network_namespaces(run_cli, two_hosts, tmp_path):
    script = _script(tmp_path, """
        import os, torch, torch.distributed as dist
        import shoal.torch as hvd
        hvd.init()
        t = torch.tensor([float(hvd.rank() + 1)])
        dist.all_reduce(t)
        print("where", hvd.rank(), hvd.size(), os.stat("/proc/self/ns/net").st_ino, int(t.item()),
              os.environ.get("SHOAL_AUTOTUNE"), flush=True)
    """)
    r = run_cli(["run", "-np", "2", *_hosts_args(two_hosts, 1), "--no-autotune", "python", script],
                timeout_s=90)
    assert r.returncode == 0, r.describe()
    inode = [os.stat(f"/run/netns/{ns}").st_ino for ns in two_hosts.node_ns]
    got = sorted(tuple(ln.split("where ")[1].split()) for ln in r.stdout.splitlines() if "where" in ln)
    # Rank 0 on the first host, rank 1 on the second; the allreduce crossed the link (1 + 2);
    # the knob flag reached the remote agent's workers.
    assert got == [("0", "2", str(inode[0]), "3", "false"), ("1", "2", str(inode[1]), "3", "false")], \
        r.describe()


def test_two_hosts_one_rank_fails_all_agents_stop(run_cli, two_hosts, tmp_path):
    script = _script(tmp_path, """
        import time
        import shoal.torch as hvd
        hvd.init()
        if hvd.rank() == 1:
            raise RuntimeError("second host gave up")
        time.sleep(300)  # rank 0 lives on the other host: only the launcher can stop it
    """)
    r = run_cli(["run", "-np", "2", *_hosts_args(two_hosts, 1), "python", script], timeout_s=90)
    assert r.returncode == 1, r.describe()
    assert r.shoal_lines()[0] == "shoal: rank 1 failed: RuntimeError: second host gave up", r.describe()
