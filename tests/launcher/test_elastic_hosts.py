"""Elastic training on several hosts through the real ``shoal run --min-np/--max-np -H ...``: hosts are network
namespaces (``shoal.testing.cluster.EmulatedCluster``), each with its own host name (a UTS namespace), joined by a
link; the coordinator runs inside the first one (the root namespace cannot reach them) and starts one agent per
host with ``--remote-command 'ip netns exec {host} unshare --uts ...'``.

The job trains a small linear model in lockstep (every rank the same step count, data chosen by step and rank) and
commits at every step; each rank prints one JSON line per event, which the tests read. Recovery times are printed
(``-s`` shows them) for docs/elastic.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap

import pytest

from elastic_job import SETUP  # tests/launcher is on sys.path (rootdir-relative imports)
from elastic_job import assert_same_weights as _assert_same_weights
from elastic_job import done as _done
from elastic_job import events as _events

pytestmark = pytest.mark.timeout(120)

_JOB = SETUP + textwrap.dedent('''
    mode, victim, at, total, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    state = hvd.elastic.TorchState(model, opt, steps=0, peak=0)

    def say(**kw):
        print("EVENT " + json.dumps({"wid": wid, "rank": hvd.rank(), "size": hvd.size(), "gen": _rt.generation(),
                                     "host": socket.gethostname(), "local_rank": hvd.local_rank(),
                                     "local_size": hvd.local_size(), "t": time.time(), **kw}), flush=True)

    def lose_my_host():
        # Every process of this network namespace (the host's agent, its sentinel, its workers), this one last.
        mine = os.stat("/proc/self/ns/net").st_ino
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != os.getpid() and os.stat(f"/proc/{pid}/ns/net").st_ino == mine:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    def finished():
        if state.steps < total:
            return False
        if mode == "grow":  # grew to `want`, then shrank back to where it started
            return state.peak >= want and hvd.size() < want
        return hvd.size() >= want

    @hvd.elastic.run
    def train(state):
        say(what="start", steps=state.steps, rec=_el.recovery_times())
        while not finished() and time.time() - t0 < 60:
            state.peak = max(state.peak, hvd.size())
            idx = [(state.steps * 4 * hvd.size() + hvd.rank() * 4 + i) % 96 for i in range(4)]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(data[idx]), target[idx]).backward()
            if wid == victim and state.steps == at:
                say(what="fault")
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "host":  # its agent dies too: its tee of this output may never come out
                    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault.json"), "w") as fh:
                        json.dump({"what": "fault", "gen": _rt.generation(), "t": time.time()}, fh)
                    lose_my_host()
            opt.step()
            state.steps += 1
            say(what="step", steps=state.steps)
            time.sleep(0.05)
            state.commit()
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        say(what="done", steps=state.steps, weights=w.tolist())

    t0 = time.time()
    train(state)
''')

_READY = textwrap.dedent('''
    import os, time
    import torch
    import shoal.torch as hvd
    hvd.init()
    hvd.allreduce(torch.ones(1), name="up")  # every worker of generation 0 is up, on both hosts
    if hvd.rank() == 0:
        print("ready", hvd.size(), flush=True)
    time.sleep(300)  # only the agents' stop can end them once the coordinator is gone
''')


def _assert_local_topology(events: list[dict]) -> None:
    """In every generation, each rank's local_rank / local_size match the host names of its generation."""
    by_gen: dict[int, dict[int, dict]] = {}
    for e in events:
        by_gen.setdefault(e["gen"], {})[e["rank"]] = e
    for gen, ranks in by_gen.items():
        if len(ranks) != next(iter(ranks.values()))["size"]:
            continue  # not every rank printed in this generation
        hosts: dict[str, list[int]] = {}
        for r in sorted(ranks):
            hosts.setdefault(ranks[r]["host"], []).append(r)
        for host, rs in hosts.items():
            assert rs == list(range(rs[0], rs[0] + len(rs))), (gen, hosts)  # contiguous per host
            for i, r in enumerate(rs):
                assert (ranks[r]["local_rank"], ranks[r]["local_size"]) == (i, len(rs)), (gen, ranks[r])


@pytest.fixture(name="hosts")
def _hosts():
    """Two network namespaces with their own host names, joined by a link."""
    from shoal.testing.cluster import EmulatedCluster, check_available

    reason = check_available()
    if reason:
        pytest.skip(f"cannot create network namespaces here ({reason}); needs `ip netns add` (root)")
    cluster = EmulatedCluster(nodes=2, ranks_per_node=1, rate=None, hostnames=True)
    with cluster:
        if not cluster.hostnames_enabled:
            pytest.skip("no UTS namespaces here: the emulated hosts would share a host name")
        yield cluster


def _remote() -> str:
    # Each agent in its host's network namespace, with the host's own name (a UTS namespace of its own).
    return "ip netns exec {host} unshare --uts -- sh -c 'hostname \"$0\" && exec \"$@\"' {host}"


def _cli(cluster, *args: str) -> tuple[list[str], list[str]]:
    """(the prefix that runs the coordinator in the first host, the flags every test gives)."""
    return (["ip", "netns", "exec", cluster.node_ns[0]],
            ["run", *args, "--remote-command", _remote(), "--master-addr", cluster.addresses[0],
             "-x", f"GLOO_SOCKET_IFNAME={cluster.interface}"])


def _job(tmp_path) -> str:
    path = tmp_path / "job.py"
    path.write_text(_JOB)
    return str(path)


_ENV = {"SHOAL_TIMEOUT_S": "20"}


def _recovery(ev: list[dict], fault: dict) -> tuple[float, dict]:
    """Seconds from the fault to the survivors' first step in the next generation, and rank 0's phases."""
    after = [e for e in ev if e["what"] == "step" and e["gen"] > fault["gen"] and e["t"] > fault["t"]]
    starts = [e for e in ev if e["what"] == "start" and e["rank"] == 0 and e["gen"] > fault["gen"]]
    phases = dict(starts[0]["rec"]) if starts else {}
    if "failed_at" in phases:
        phases["detect"] = phases.pop("failed_at") - fault["t"]
    return after[0]["t"] - fault["t"], {k: round(v, 3) for k, v in phases.items()}


def _fault_on_two_hosts(run_cli, hosts, tmp_path, mode: str, victim: int, want: int):
    """4 workers on 2 hosts x 2 slots; worker ``victim`` makes fault ``mode`` at step 4; the job ends at step 10
    with ``want`` workers. ``elastic_timeout_s`` is 20 s, so a recovery that waited for it shows."""
    prefix, args = _cli(hosts, "-np", "4", "--min-np", "2", "--max-np", "4",
                        "-H", f"{hosts.node_ns[0]}:2,{hosts.node_ns[1]}:2")
    return run_cli([*args, "python", _job(tmp_path), mode, str(victim), "4", "10", str(want)], prefix=prefix,
                   timeout_s=90, env={**_ENV, "SHOAL_ELASTIC_TIMEOUT_S": "20"})


def test_worker_killed_on_the_second_host_is_replaced_there(run_cli, hosts, tmp_path):
    r = _fault_on_two_hosts(run_cli, hosts, tmp_path, "kill", victim=2, want=4)
    assert r.returncode == 0, r.describe()
    ev = _events(r.stdout)
    fault = next(e for e in ev if e["what"] == "fault")
    assert fault["host"] == hosts.node_ns[1], fault
    took, phases = _recovery(ev, fault)
    print(f"\nrecovery, worker SIGKILLed on host 1: {took:.2f} s to the survivors' first step; rank 0: {phases}")
    assert took < 10, (took, r.describe())  # not the 20 s elastic_timeout_s
    done = _done(ev)
    assert sorted(e["wid"] for e in done) == [0, 1, 3, 4] and {e["size"] for e in done} == {4}, r.describe()
    replacement = next(e for e in done if e["wid"] == 4)
    assert replacement["host"] == hosts.node_ns[1] and replacement["local_rank"] == 0, replacement
    _assert_same_weights(done)
    _assert_local_topology(ev)
    print("checksum", sum(done[0]["weights"]))
    assert "recovered from 1 failure(s): worker 2 (killed by SIGKILL" in r.stderr, r.stderr


def test_a_whole_host_lost_costs_no_elastic_timeout(run_cli, hosts, tmp_path):
    r = _fault_on_two_hosts(run_cli, hosts, tmp_path, "host", victim=3, want=2)
    assert r.returncode == 0, r.describe()
    ev = _events(r.stdout)
    fault = json.loads((tmp_path / "fault.json").read_text())
    took, phases = _recovery(ev, fault)
    print(f"\nrecovery, host 1 lost (every process in it SIGKILLed): {took:.2f} s to the survivors' first step; "
          f"rank 0: {phases}")
    assert took < 10, (took, r.describe())  # the survivors did not wait the 20 s elastic_timeout_s
    assert f"host {hosts.node_ns[1]} lost" in r.stderr, r.stderr
    done = _done(ev)
    assert sorted(e["wid"] for e in done) == [0, 1] and {e["size"] for e in done} == {2}, r.describe()
    assert {e["host"] for e in done} == {hosts.node_ns[0]}
    _assert_same_weights(done)
    _assert_local_topology(ev)


def test_discovery_script_adds_a_host_and_removes_it(run_cli, hosts, tmp_path):
    n0, n1 = hosts.node_ns
    listing = tmp_path / "hosts.txt"
    listing.write_text(f"{n0}:2\n")
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(0o755)
    phase = {"grown": False, "shrunk": False}

    def rewrite(text: str) -> None:
        tmp = tmp_path / "hosts.tmp"
        tmp.write_text(text)
        os.replace(tmp, listing)  # the script never reads half a file

    def drive(line: str) -> None:
        m = re.search(r"EVENT (\{.*\})", line)
        if not m:
            return
        e = json.loads(m.group(1))
        if e["what"] == "step" and e["steps"] >= 3 and not phase["grown"]:
            phase["grown"] = True
            rewrite(f"{n0}:2\n{n1}:2\n")
        if e["what"] == "step" and e["size"] == 4 and e["steps"] >= 3 and not phase["shrunk"]:
            phase["shrunk"] = True
            rewrite(f"{n0}:2\n")

    prefix, args = _cli(hosts, "-np", "2", "--min-np", "2", "--max-np", "4", "--host-discovery-script", str(script))
    r = run_cli([*args, "python", _job(tmp_path), "grow", "-1", "-1", "6", "4"], prefix=prefix, timeout_s=110,
                env=_ENV, on_stdout=drive)
    assert r.returncode == 0, r.describe()
    ev = _events(r.stdout)
    grown = [e for e in ev if e["what"] == "step" and e["size"] == 4]
    assert {e["host"] for e in grown} == {n0, n1}, r.describe()  # the added host's workers joined
    assert f"host {n1} appeared" in r.stderr and f"host {n1} left the discovery script's output" in r.stderr
    assert "left the elastic job" in r.stderr, r.stderr  # ... and left gracefully (SIGTERM, next commit)
    assert "stopping worker" not in r.stderr and "failure" not in r.stderr, r.stderr
    done = _done(ev)
    assert sorted(e["wid"] for e in done) == [0, 1] and {e["size"] for e in done} == {2}, r.describe()
    _assert_same_weights(done)
    _assert_local_topology(ev)


def test_sigkill_of_the_coordinator_leaves_nothing_on_any_host(run_cli, hosts, tmp_path):
    script = tmp_path / "ready.py"
    script.write_text(_READY)
    prefix, args = _cli(hosts, "-np", "4", "--min-np", "2", "--max-np", "4",
                        "-H", f"{hosts.node_ns[0]}:2,{hosts.node_ns[1]}:2")
    r = run_cli([*args, "python", str(script)], prefix=prefix, timeout_s=90, interrupt_on="ready",
                interrupt_signal=signal.SIGKILL, settle_s=8.0)
    assert r.returncode == -signal.SIGKILL, r.describe()
    print(f"\ncoordinator SIGKILLed: every agent and worker on both hosts gone {r.drained_s:.2f} s later")
    assert r.drained_s < 5.0, f"agents or workers outlived the coordinator by {r.drained_s:.1f} s\n{r.describe()}"
    for ns in hosts.node_ns:  # nothing at all left in either host (run_cli checks the job's own processes)
        inode = os.stat(f"/run/netns/{ns}").st_ino
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                left += [pid] if os.stat(f"/proc/{pid}/ns/net").st_ino == inode else []
            except OSError:
                pass
        assert not left, (ns, left)


def test_master_address_not_of_this_host_is_a_usage_error(run_cli):
    r = run_cli(["run", "-np", "2", "--min-np", "1", "--max-np", "2", "-H", "node-a:1,node-b:1",
                 "--master-addr", "192.0.2.7", "python", "-c", "print('never runs')"], timeout_s=30)
    assert r.returncode == 2 and "never runs" not in r.stdout, r.describe()
    assert "--master-addr 192.0.2.7 is not an address of this host" in r.stderr and "HINT" in r.stderr, r.stderr


def test_hosts_and_a_discovery_script_together_are_a_usage_error(run_cli, tmp_path):
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    r = run_cli(["run", "-np", "2", "--min-np", "1", "-H", "node-a:2", "--host-discovery-script", str(script),
                 "python", "-c", "print('never runs')"], timeout_s=30)
    assert r.returncode == 2 and "not both" in r.stderr, r.describe()
