"""Acceptance tests of ``shoal run``: the real command, real workers, real torch.distributed groups.

Every run goes through ``run_cli`` (conftest.py): own session, deadline, nothing left running.
"""

from __future__ import annotations

import os
import re
import signal
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
    (["-H", "::1"], "an IPv6 address needs brackets: [::1]"),
    (["-H", "a:2:3"], "more than one ':'"),
    (["--hosts=-oProxyCommand=touch /tmp/shoal-pwned:1"], "a host name may not start with '-'"),
    (["-H", "a:2", "--remote-command", "ssh {host} {0}"], "only {host} is replaced, not {0}"),
    (["-H", "a:2", "--master-addr=-oProxyCommand=x"], "cannot use host '-oProxyCommand=x'"),
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
        # The secret reached the ranks on the agents' stdin: no command line holds it (any local
        # user can read every command line).
        secret = os.environ["SHOAL_JOB_SECRET"].encode()
        in_argv = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    in_argv += [pid] if secret in fh.read() else []
            except OSError:
                pass
        print("secret", hvd.rank(), len(secret), in_argv, flush=True)
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
    assert "[rank0]: secret 0 32 []" in r.stdout and "[rank1]: secret 1 32 []" in r.stdout, r.describe()


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


# --------------------------------------------------------------------- the launcher dies (SIGKILL)


_READY = """
    import os, time
    print("ready", os.getpid(), os.environ["TORCHELASTIC_ERROR_FILE"], flush=True)
    time.sleep(300)  # only the sentinel can stop it once the launcher is gone
"""


def _temp_dir_of(stdout: str) -> str:
    """The launcher's temporary directory, from an error-file path a rank printed."""
    path = re.search(r"ready \d+ (\S+)", stdout).group(1)
    root = path.split(os.sep + "shoal-run-")[0]
    return os.path.join(root, "shoal-run-" + path.split("shoal-run-")[1].split(os.sep)[0])


def test_sigkill_of_the_launcher_stops_every_rank_within_5s_and_removes_its_temp_dir(run_cli, tmp_path):
    # Before the sentinel: both ranks, re-parented to PID 1, ran on for over 100 s; the dir stayed.
    script = _script(tmp_path, _READY)
    r = run_cli(["run", "-np", "2", "python", script], timeout_s=60, interrupt_on="ready",
                interrupt_signal=signal.SIGKILL, settle_s=8.0)
    assert r.returncode == -signal.SIGKILL, r.describe()
    assert r.drained_s < 5.0, f"ranks outlived the launcher by {r.drained_s:.1f} s\n{r.describe()}"
    assert "shoal: the launcher's agent on" in r.stderr and "died without stopping its ranks" in r.stderr
    assert not os.path.exists(_temp_dir_of(r.stdout)), r.describe()


def test_sigkill_of_the_launcher_stops_non_python_commands_and_their_children(run_cli):
    # sh is the rank; `sleep` its child, in the rank's process group: both must go.
    r = run_cli(["run", "-np", "2", "sh", "-c",
                 'echo ready 0 "$TORCHELASTIC_ERROR_FILE"; sleep 300; echo never'],
                timeout_s=60, interrupt_on="ready", interrupt_signal=signal.SIGKILL, settle_s=8.0)
    assert r.returncode == -signal.SIGKILL, r.describe()
    assert r.drained_s < 5.0, f"processes outlived the launcher by {r.drained_s:.1f} s\n{r.describe()}"
    assert not os.path.exists(_temp_dir_of(r.stdout)), r.describe()


# ------------------------------------------------------------------- bad input before ranks start


@pytest.mark.parametrize("env, flags, expected", [
    ({"SHOAL_FUSION_THRESHOLD_MB": "nan"}, [], "fusion_threshold_mb must be a finite number"),
    ({"SHOAL_NUM_STREAMS": "two"}, [], "cannot parse SHOAL_NUM_STREAMS='two'"),
    ({}, ["--timeout-s", "inf"], "timeout_s must be a finite number"),
    ({}, ["--stall-timeout-s", "nan"], "stall_timeout_s must be a finite number"),
])
def test_bad_knob_values_are_refused_before_any_rank_starts(run_cli, env, flags, expected):
    r = run_cli(["run", "-np", "2", *flags, "python", "-c", "print('never runs')"], env=env, timeout_s=30)
    assert r.returncode == 2 and expected in r.stderr and "never runs" not in r.stdout, r.describe()
    assert ("inherited from this shell" in r.stderr) == bool(env), r.describe()
    assert r.duration_s < 10, r.describe()  # no rank, no torch import


def test_a_flag_replaces_a_bad_inherited_value():
    from shoal.runner import launch

    launch._check_inherited_knobs({"SHOAL_NUM_STREAMS": "2"})  # the flag's value is what ranks see
    with pytest.raises(ValueError, match="inherited"):
        launch._check_inherited_knobs({"SHOAL_NUM_STREAMS": "0"})


def test_missing_script_is_a_usage_error_before_any_rank_starts(run_cli, tmp_path):
    r = run_cli(["run", "-np", "2", "python", str(tmp_path / "nosuch.py")], timeout_s=30)
    assert r.returncode == 2 and "can't open file" in r.stderr and "nosuch.py" in r.stderr, r.describe()
    assert "[rank" not in r.stderr and r.duration_s < 10, r.describe()  # was 11 s, then rc 1


def test_misspelled_variable_is_warned_about_with_the_closest_name(run_cli):
    r = run_cli(["run", "-np", "1", "python", "-c", _INIT + "print('ok')"], env={"SHOAL_NAN_CHEK": "raise"})
    assert r.returncode == 0, r.describe()
    lines = [ln for ln in r.stderr.splitlines() if "SHOAL_NAN_CHEK" in ln]
    assert len(lines) == 1 and "did you mean SHOAL_NAN_CHECK?" in lines[0], r.describe()


# ------------------------------------------------------------------------------ the job's store


def _other_address() -> str:
    """An address of this machine that is not loopback ("" when it has none)."""
    import subprocess

    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                         text=True, check=False).stdout
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else ""


def test_store_listens_on_loopback_and_keys_the_job_under_its_secret(run_cli, tmp_path):
    import datetime
    import socket

    import torch.distributed as dist

    go = tmp_path / "go"
    script = _script(tmp_path, f"""
        import os, time
        import torch.distributed as dist
        import shoal.torch as hvd
        hvd.init()
        store = dist.distributed_c10d._get_default_store()  # where Shoal keeps its records
        store.set(f"shoal/doing/{{hvd.rank()}}", f"real {{hvd.rank()}}")
        dist.barrier()
        print("port", os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print("seen", hvd.rank(), store.get(f"shoal/doing/{{hvd.rank()}}").decode(), flush=True)
    """)
    stranger: dict = {}

    def _act(line: str) -> None:
        if not line.startswith("[rank0]: port"):
            return
        addr, port = line.split()[2], int(line.split()[3])
        stranger["addr"] = addr
        other = _other_address()
        if other:  # bound to loopback: nothing answers on the machine's other address
            with socket.socket() as s:
                stranger["other"] = s.connect_ex((other, port))
        client = dist.TCPStore(addr, port, None, False, datetime.timedelta(seconds=5),
                               wait_for_workers=False)
        # The names the records had before the secret (torch's default_pg prefix), and bare.
        names = [f"{p}shoal/doing/{r}" for p in ("", "default_pg/", "/worker/attempt_0/default_pg/")
                 for r in (0, 1)]
        stranger["seen"] = [n for n in names if client.check([n])]
        for n in names:
            client.set(n, "forged")
        go.touch()

    r = run_cli(["run", "-np", "2", "python", script], timeout_s=90, on_stdout=_act)
    assert r.returncode == 0, r.describe()
    assert stranger["addr"] == "127.0.0.1"
    assert stranger["seen"] == [], stranger  # nothing of the job is where a stranger can name it
    assert "[rank0]: seen 0 real 0" in r.stdout and "[rank1]: seen 1 real 1" in r.stdout, r.describe()
    if "other" in stranger:
        assert stranger["other"] != 0, "the store answered on a non-loopback address"


# ------------------------------------------------------------ the culprit, from the ranks' fields
# These raise Shoal's errors with their fields set, as the engine does, so that they test the launcher
# against the field contract whatever the engine fills in (the fault table runs the real faults).


def test_busy_rank_named_by_a_stall_error_is_the_root_cause(run_cli, tmp_path):
    script = _script(tmp_path, """
        import os, time
        from shoal.core.errors import StallError
        if os.environ["RANK"] == "1":
            print("busy", flush=True)
            time.sleep(300)  # busy outside any collective: it never fails on its own
        time.sleep(1)
        raise StallError("shoal: rank 0 has waited 3 s for bucket 0: rank 1 never reached a collective",
                         rank=0, missing_ranks=[1], waited_s=3.0)
    """)
    r = run_cli(["run", "-np", "2", "python", script], timeout_s=60)
    lines = r.shoal_lines()
    assert r.returncode == 1, r.describe()
    assert lines[0] == ("shoal: rank 1 is the root cause: named by rank 0 (StallError: shoal: rank 0 has "
                        "waited 3 s for bucket 0: rank 1 never reached a collective)"), r.describe()
    assert lines[1] == "shoal:   rank 1 was still running when shoal stopped it", r.describe()
    assert "the root cause is rank 1" in lines[-1], r.describe()


def test_rank_that_exited_normally_while_others_waited_is_named(run_cli, tmp_path):
    left = tmp_path / "left"
    script = _script(tmp_path, f"""
        import os, time
        from shoal.core.errors import RankFailureError
        if os.environ["RANK"] == "1":
            open({str(left)!r}, "w").close()
            raise SystemExit(0)  # skipped its collective and ended normally
        while not os.path.exists({str(left)!r}):
            time.sleep(0.05)
        time.sleep(0.5)
        raise RankFailureError("shoal: allreduce failed on rank 0 because rank 1 exited", rank=0,
                               dead_ranks=[1])
    """)
    r = run_cli(["run", "-np", "2", "python", script], timeout_s=60)
    lines = r.shoal_lines()
    assert r.returncode == 1, r.describe()
    assert lines[0].startswith("shoal: rank 1 is the root cause: named by rank 0 (RankFailureError: "), \
        r.describe()
    assert lines[1] == "shoal:   rank 1 exited normally (code 0) while rank 0 still waited for it", \
        r.describe()


def test_two_hosts_sigkill_of_the_coordinator_stops_every_agent_and_rank_within_5s(run_cli, two_hosts,
                                                                                   tmp_path):
    script = _script(tmp_path, _READY)
    r = run_cli(["run", "-np", "2", *_hosts_args(two_hosts, 1), "python", script], timeout_s=90,
                interrupt_on="ready", interrupt_signal=signal.SIGKILL, settle_s=8.0)
    assert r.returncode == -signal.SIGKILL, r.describe()
    assert r.drained_s < 5.0, f"agents or ranks outlived the coordinator by {r.drained_s:.1f} s\n{r.describe()}"


def test_two_hosts_master_address_on_loopback_is_refused_with_a_hint(run_cli, two_hosts):
    args = _hosts_args(two_hosts, 1)
    args[args.index("--master-addr") + 1] = "127.0.0.1"  # what a host name mapped to 127.0.1.1 gives
    r = run_cli(["run", "-np", "2", *args, "python", "-c", "print('never runs')"], timeout_s=90)
    assert r.returncode != 0 and "never runs" not in r.stdout, r.describe()
    assert "(loopback)" in r.stderr and "HINT: give --master-addr as the first host's address" in r.stderr, \
        r.describe()
