"""``shoal run`` in elastic mode (``--min-np`` / ``--max-np`` / ``--host-discovery-script``): the job goes on
when workers die, leave or hang, when hosts come and go, and new workers join it.

The workers do the recovery themselves, in their processes (:mod:`shoal.core.elastic`): they agree on each
generation in the job's store and rebuild their process groups. The launcher keeps what outlives any
worker: the store, and the count of workers. It starts ``-np`` of them, replaces a worker that failed
(or left) while the job runs and is below its target, stops a worker that the others left out of a
generation (a hung one), and ends when every worker has ended.

Design constraints:

1. torch's pieces, composed: every worker is started by torch's ``start_processes`` (the same machinery
   as torchrun's agent: per-worker logs teed with a line prefix, the error file the worker shim writes);
   torch's ``LocalElasticAgent`` is not used, because on a worker's failure it stops every worker (to
   restart them all from a checkpoint), which is what elastic mode exists to avoid.
2. The launching process is the coordinator and holds the job's store, keyed under the job's secret
   (:mod:`shoal.runner.agent`), so the store outlives every worker; the workers are clients. It binds ONE
   address: loopback on one host; with several hosts ``--master-addr`` (checked to be an address of this
   host: the store cannot live anywhere else) or else the address this host's route to the first other
   host uses, never every interface. Horovod's elastic driver also runs the rendezvous on the launching
   host. The consequence, said plainly in docs/elastic.md: losing the coordinator's host ends the job.
3. ONE policy, several hosts: the replace / evict / target logic (:class:`_Launcher`) drives hosts through
   one small interface (start a worker with the id and local rank the policy chose, report each worker's
   end, stop a worker). One host runs in this process (:class:`_InProcessHost`, as before: no extra
   process, no extra hop); several hosts get one agent each (:class:`_RemoteHost`), started through the
   remote command exactly as the static launcher starts its agents (the same function of
   :mod:`shoal.runner.launch`: the secret on stdin, host names validated and quoted). The agent is a thin
   executor (:func:`serve_host`) around the same :class:`_LocalWorkers` the in-process host uses.
4. No new transport: coordinator <-> agent messages are JSON records in the job's c10d store (commands
   ``shoal/el/host/<i>/cmd/<k>``, events ``shoal/el/host/<i>/event/<k>``, each stream with a counter written
   after its record by its only writer). Nothing crossing processes is unpickled (a worker's failure
   travels as ``dataclasses.asdict``).
5. A lost host costs no timeout: when an agent's remote command exits (the host died, was unplugged, or
   the agent was killed) or the host leaves the discovery script's output, its workers count as ended at
   once: the coordinator writes ``shoal/el/gone/<id>`` for each, which the survivors' agreement honours
   (:mod:`shoal.core.membership`), instead of waiting ``elastic_timeout_s`` for peers whose pids it cannot
   see from another host. The same key is written for every worker whose end an agent reports.
6. Replacements fill the hosts in order (slots from ``-H`` or the discovery script), each on the lowest
   free local rank of its host, so that a host's workers stay together and ``LOCAL_RANK`` is unique per
   host (a GPU each); ``local_rank()``/``local_size()`` come from every generation's host names
   (:func:`shoal.core.runtime`), and the agreement keeps a host's ranks contiguous.
7. Nothing is left behind: on each host a sentinel (:mod:`shoal.runner.sentinel`) knows every worker,
   including replacements, and stops them if its agent (or the one-host launcher) dies; a remote agent
   stops its workers when its stdin (the coordinator's pipe) closes or the job's store stops answering,
   so a SIGKILLed coordinator takes every host's workers with it. A hung worker the others evicted is
   stopped (SIGTERM, then SIGKILL after ``_STOP_GRACE_S``).
8. Bounded: at most ``--max-restarts`` replacements per job, so a worker that fails at start cannot make
   the launcher loop; below ``--min-np`` live workers with no replacement possible, the job fails, naming
   the hosts it lost.

Worker ids: the launcher numbers workers 0, 1, ... in the order it starts them; the first ``-np`` are the
first generation's ranks (their output lines carry ``[rank<id>]``), replacements get the next ids.

What lives elsewhere: the non-elastic launcher and the remote command (:mod:`shoal.runner.launch`,
:mod:`shoal.runner.hosts`), the agreement (:mod:`shoal.core.membership`), the failure report
(:mod:`shoal.runner.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from shoal.core import env as _env

from .hosts import format_host, parse_hosts
from .report import EXIT_LAUNCHER, Failure, failure_from_torch, print_summary, signal_name
from .sentinel import Sentinel

__all__ = ["ElasticPlan", "run_elastic", "discover_slots", "discover_hosts", "serve_host", "local_names"]

log = logging.getLogger(__name__)

_POLL_S = 0.1
#: How often the host discovery script runs (Horovod's driver polls it every second too).
_DISCOVERY_EVERY_S = 1.0
#: SIGTERM first, SIGKILL after this long, when the launcher stops a worker.
_STOP_GRACE_S = 3.0
#: Store keys of the coordinator <-> agent streams (constraint 4), under the job's secret.
_HOST_KEY = "shoal/el/host/{index}/{name}"


@dataclass(slots=True)
class ElasticPlan:
    """What the elastic launcher needs."""

    argv: list[str]                 # the worker command (through the shim), resolved on this host
    np: int                         # workers at the start, and the target while the job runs
    min_np: int
    max_np: int
    env: dict[str, str] = field(default_factory=dict)
    discovery_script: Optional[str] = None
    max_restarts: int = 10
    log_dir: Optional[str] = None
    start_timeout_s: float = 120.0
    module: str = "shoal.runner.launch"
    #: Several hosts (constraint 3): ``(host, slots)``, one agent each; None: this host, in this process.
    hosts: Optional[list[tuple[str, int]]] = None
    command: list[str] = field(default_factory=list)  # the user's command, resolved by each host's agent
    remote_command: str = ""
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    verbose: bool = False


_LEAVE_GRACE_S = 30.0   # a worker that left on purpose has this long to exit before it is stopped


@dataclass(slots=True)
class _Worker:
    """The coordinator's view of one worker."""

    wid: int
    host: "_Host"
    local_rank: int
    started: float
    pid: Optional[int] = None       # known once its host reported it started
    hostname: str = ""              # socket.gethostname() where it runs (its membership id starts with it)
    code: Optional[int] = None
    failure: Optional[Failure] = None
    was_member: bool = False        # it was in some generation (then left out of a later one: evicted)
    left: bool = False              # it ended 0 after leaving on purpose (SIGTERM), not by finishing
    stopped: bool = False           # the launcher stopped it (evicted, or a joiner the job no longer needs)
    stop_sent: str = ""             # "leave" or "stop" once asked of its host (a remote host stops it by itself)
    leaving_since: Optional[float] = None  # left out of the latest generation after it recorded a leave


def local_names() -> set[str]:
    """The names a host discovery script may use for this host."""
    return {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}


def _run_script(script: str) -> list[str]:
    proc = subprocess.run([script], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ValueError(f"shoal: host discovery script {script!r} exited with {proc.returncode}: "
                         f"{proc.stderr.strip()[:200]}")
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def discover_hosts(script: str) -> list[tuple[str, int]]:
    """Hosts and slots from a host discovery script (Horovod's contract: ``host:slots`` lines, or ``host``
    for one slot), validated as ``-H`` is (:func:`shoal.runner.hosts.parse_hosts`: a name that could be an
    option or more shell words is refused).

    Raises:
        ValueError: the script failed or printed a line that does not parse.

    Example:
        >>> discover_hosts("./discover.sh")   # prints "node1:2" and "node2:2"
        [('node1', 2), ('node2', 2)]
    """
    lines = _run_script(script)
    if not lines:
        return []
    try:
        return parse_hosts(",".join(lines))
    except ValueError as exc:
        raise ValueError(f"shoal: host discovery script {script!r}: {exc}") from None


def discover_slots(script: str) -> int:
    """Slots for this host from a host discovery script (the one-host launcher uses only this host's): the
    lines of :func:`discover_hosts` that name this host (:func:`local_names`).

    Raises:
        ValueError: the script failed or printed a line that does not parse.
    """
    me = local_names()
    return sum(slots for host, slots in discover_hosts(script) if host in me)


# ------------------------------------------------------------------------ one host's workers


class _LocalWorkers:
    """This host's workers, started with torch's ``start_processes`` (constraint 1): the executor of the
    in-process host and of every remote agent."""

    def __init__(self, argv: list[str], env: dict[str, str], run_id: str, group_rank: int, master_addr: str,
                 port: int, log_root: str, sentinel: Sentinel, np: int, min_np: int):
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std  # noqa: PLC0415

        self._specs = (DefaultLogsSpecs, Std)
        self.argv, self.env, self.run_id, self.group_rank = argv, env, run_id, group_rank
        self.master_addr, self.port, self.log_root, self.sentinel = master_addr, port, log_root, sentinel
        self.np, self.min_np = np, min_np
        self.procs: dict[int, tuple[Any, int]] = {}  # wid -> (torch's PContext, pid), while running
        self.stopped: set[int] = set()

    def start(self, wid: int, local_rank: int) -> int:
        """Start worker ``wid``; returns its pid."""
        from torch.distributed.elastic.multiprocessing import start_processes  # noqa: PLC0415

        logs_specs_cls, std = self._specs
        env = _env.child_environ({**self.env,
               "SHOAL_ELASTIC": "1", "SHOAL_ELASTIC_ID": str(wid), "SHOAL_ELASTIC_NP": str(self.np),
               "SHOAL_ELASTIC_MIN_NP": str(self.min_np), "MASTER_ADDR": self.master_addr,
               "MASTER_PORT": str(self.port), "TORCHELASTIC_RUN_ID": self.run_id,
               "GROUP_RANK": str(self.group_rank), "TORCHELASTIC_RESTART_COUNT": "0",
               "LOCAL_RANK": str(local_rank)})
        logs = logs_specs_cls(log_dir=os.path.join(self.log_root, f"worker{wid}"), tee=std.ALL)
        context = start_processes(name="worker", entrypoint=self.argv[0], args={0: tuple(self.argv[1:])},
                                  envs={0: env}, logs_specs=logs, log_line_prefixes={0: f"[rank{wid}]: "},
                                  start_method="spawn")
        pid = next(iter(context.pids().values()))
        self.sentinel.watch([pid])
        self.procs[wid] = (context, pid)
        return pid

    def poll(self) -> list[tuple[int, int, Optional[Failure], bool]]:
        """``(wid, exit code, failure, stopped by us)`` of each worker that ended since the last poll."""
        ended = []
        for wid, (context, _pid) in list(self.procs.items()):
            result = context.wait(0)
            if result is None:
                continue
            failures = getattr(result, "failures", {}) or {}
            failure, code = None, 0
            if failures:
                pf = next(iter(failures.values()))
                code = pf.exitcode
                failure = failure_from_torch(wid, pf, None, socket.gethostname())
            context.close()
            del self.procs[wid]
            ended.append((wid, code, failure, wid in self.stopped))
        return ended

    def ended_on_its_own(self, wid: int) -> bool:
        """Whether worker ``wid`` ended, or is exiting, by itself: then its own exit status is the story (the
        next :meth:`poll` records it) and it is not stopped. The survivors of a SIGKILL count a peer as gone
        as soon as it is exiting (its sockets close before it turns zombie) and form their next generation in
        milliseconds, often before that poll: the worker then looked evicted and its failure was left out of
        the summary (1 run in ~30 of a killed worker on a loaded 2-core machine)."""
        from shoal.core.runtime import _is_dead  # noqa: PLC0415 (the workers' liveness rule, membership's too)

        context, pid = self.procs[wid]
        if context.wait(0) is not None:
            return True
        if not _is_dead(pid):
            return False
        deadline = time.monotonic() + _STOP_GRACE_S  # exiting: the kernel finishes it within milliseconds
        while time.monotonic() < deadline:
            if context.wait(0) is not None:
                return True
            time.sleep(0.02)
        return False

    def stop(self, wid: int, why: str, leave: bool = False) -> bool:
        """Stop worker ``wid`` (SIGTERM, then SIGKILL after ``_STOP_GRACE_S``); with ``leave``, only SIGTERM
        (an elastic worker then leaves at its next commit). Returns False when it ended on its own."""
        if wid not in self.procs or self.ended_on_its_own(wid):
            return False
        context, pid = self.procs[wid]
        print(f"shoal: {'asking worker' if leave else 'stopping worker'} {wid} (pid {pid} on "
              f"{socket.gethostname()}){' to leave' if leave else ''}: {why}", file=sys.stderr, flush=True)
        self.stopped.add(wid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        if leave:
            return True
        deadline = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < deadline and context.wait(0) is None:
            time.sleep(0.05)
        if context.wait(0) is None:
            context.close(death_sig=signal.SIGKILL)
        return True

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for wid, (_context, pid) in self.procs.items():
            self.stopped.add(wid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _STOP_GRACE_S
        while any(c.wait(0) is None for c, _ in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for context, _pid in self.procs.values():
            context.close(death_sig=signal.SIGKILL)


# ------------------------------------------------------------------------------ the hosts


class _Host:
    """One host as the policy sees it (constraint 3)."""

    name: str
    slots: int
    gone: bool = False       # lost, or retired and closed: no worker runs or starts here any more
    retiring: bool = False   # left the discovery script's output: its workers are asked to leave

    def start(self, worker: _Worker) -> None:
        raise NotImplementedError

    def poll(self) -> list[dict]:
        """Events since the last poll: ``{"what": "started", "wid", "pid", "host"}`` and ``{"what": "ended",
        "wid", "code", "failure", "stopped"}``."""
        raise NotImplementedError

    def stop(self, worker: _Worker, why: str, leave: bool = False) -> None:
        raise NotImplementedError

    def stop_all(self, sig: int) -> None:
        raise NotImplementedError

    def lost(self) -> Optional[str]:
        """Why this host is lost (its agent's remote command ended), None while it serves."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class _InProcessHost(_Host):
    """This host, its workers started by this process (one-host jobs)."""

    def __init__(self, workers: _LocalWorkers, slots: int):
        self.name = socket.gethostname()
        self.slots = slots
        self.workers = workers
        self._events: list[dict] = []

    def start(self, worker: _Worker) -> None:
        worker.pid = self.workers.start(worker.wid, worker.local_rank)
        worker.hostname = self.name

    def poll(self) -> list[dict]:
        events, self._events = self._events, []
        for wid, code, failure, stopped in self.workers.poll():
            events.append({"what": "ended", "wid": wid, "code": code, "stopped": stopped,
                           "failure": dataclasses.asdict(failure) if failure else None})
        return events

    def stop(self, worker: _Worker, why: str, leave: bool = False) -> None:
        worker.stopped = self.workers.stop(worker.wid, why, leave) or worker.stopped

    def stop_all(self, sig: int) -> None:
        self.workers.stop_all(sig)

    def close(self) -> None:
        self.workers.sentinel.done()


class _RemoteHost(_Host):
    """A host served by an agent (:func:`serve_host`) started through the remote command (constraints 3, 4)."""

    def __init__(self, index: int, name: str, slots: int, plan: ElasticPlan, secret: str, store: Any,
                 run_id: str, port: int):
        from .launch import _encode_json, _start_remote_agent  # noqa: PLC0415 (launch imports this module)

        self.index, self.name, self.slots, self.store = index, name, slots, store
        self._cmds = 0
        self._events = 0
        self.tails = [""]
        agent = {"index": index, "host": name, "command": plan.command, "env": plan.env, "run_id": run_id,
                 "master_addr": plan.master_addr, "master_port": port, "np": plan.np, "min_np": plan.min_np,
                 "log_dir": plan.log_dir, "start_timeout_s": plan.start_timeout_s, "verbose": plan.verbose}
        self.proc, self.pump = _start_remote_agent(plan.remote_command, name, ["--elastic-agent", _encode_json(agent)],
                                                  secret, 0, queue.Queue(), [], self.tails)
        self._closing_since: Optional[float] = None
        self._termed: set[int] = set()

    def _key(self, name: str) -> str:
        return _HOST_KEY.format(index=self.index, name=name)

    def _send(self, command: dict) -> None:
        if self.gone:
            return
        self._cmds += 1
        try:
            self.store.set(self._key(f"cmd/{self._cmds}"), json.dumps(command))
            self.store.add(self._key("cmds"), 1)  # after its record: the agent reads only what is complete
        except RuntimeError as exc:
            log.warning("shoal: cannot reach host %s's agent through the store: %s", self.name, exc)

    def start(self, worker: _Worker) -> None:
        self._send({"op": "start", "wid": worker.wid, "local_rank": worker.local_rank})

    def poll(self) -> list[dict]:
        try:
            count = int(self.store.add(self._key("events"), 0))
            keys = [self._key(f"event/{k}") for k in range(self._events + 1, count + 1)]
            values = self.store.multi_get(keys) if keys else []
        except RuntimeError:
            return []
        self._events = count
        return [json.loads(v.decode()) for v in values]

    def stop(self, worker: _Worker, why: str, leave: bool = False) -> None:
        if not worker.stop_sent or (worker.stop_sent == "leave" and not leave):
            worker.stop_sent = "leave" if leave else "stop"
            self._send({"op": "stop", "wid": worker.wid, "why": why, "leave": leave})

    def stop_all(self, sig: int) -> None:
        self._send({"op": "stop_all", "sig": int(sig)})

    def lost(self) -> Optional[str]:
        code = self.proc.poll()
        if code is None:
            return None
        what = f"killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        return f"its agent's remote command {what}" + (f": {self.tails[0]}" if self.tails[0] else "")

    def close(self, wait: bool = True) -> None:
        """Stop the agent as the static launcher does (close its stdin, then signals): it stops its workers."""
        from .launch import _stop_agents  # noqa: PLC0415

        if self._closing_since is None:
            self._closing_since = time.monotonic()
        while True:
            _stop_agents([self.proc], time.monotonic() - self._closing_since, self._termed)
            if self.proc.poll() is not None or not wait:
                break
            time.sleep(0.05)
        if self.proc.poll() is not None:
            self.pump.join(timeout=5)


# ------------------------------------------------------------------------------ the policy


class _Launcher:
    def __init__(self, plan: ElasticPlan, secret: str):
        from . import agent as _agent  # noqa: PLC0415 (imports torch)

        self.plan = plan
        self.secret = secret
        self.run_id = secrets.token_hex(16)
        self.hosts: list[_Host] = []
        self.workers: dict[int, _Worker] = {}
        self.next_id = 0
        self.restarts = 0
        self.failures: list[Failure] = []
        self.lost_hosts: list[str] = []
        self.target = plan.np
        self._discovered_at = 0.0
        self.log_root = ""
        multi = plan.hosts is not None
        self.store, self.port = _agent.open_store(plan.master_addr, plan.master_port, True, secret,
                                                  plan.start_timeout_s, remote_peers=multi)
        if multi:
            for name, slots in plan.hosts:
                self.add_host(name, slots)
            return
        self.log_root = plan.log_dir or tempfile.mkdtemp(prefix="shoal-run-")
        os.makedirs(self.log_root, exist_ok=True)
        sentinel = Sentinel.start(plan.module, None if plan.log_dir else self.log_root)
        sentinel.job(self.run_id, 0)
        self.hosts.append(_InProcessHost(_LocalWorkers(plan.argv, plan.env, self.run_id, 0, "127.0.0.1", self.port,
                                                       self.log_root, sentinel, plan.np, plan.min_np),
                                         max(plan.max_np, 1)))

    def add_host(self, name: str, slots: int) -> _Host:
        host = _RemoteHost(len(self.hosts), name, slots, self.plan, self.secret, self.store, self.run_id, self.port)
        self.hosts.append(host)
        return host

    # ------------------------------------------------------------------------------- workers
    def _on(self, host: _Host) -> list[_Worker]:
        return [w for w in self.live() if w.host is host]

    def free_host(self) -> Optional[_Host]:
        """The first host with a free slot (constraint 6: hosts filled in order)."""
        for host in self.hosts:
            if not host.gone and not host.retiring and len(self._on(host)) < host.slots:
                return host
        return None

    def start_worker(self, host: Optional[_Host] = None) -> _Worker:
        host = host or self.free_host()
        if host is None:
            raise RuntimeError("shoal: no host has a free slot")
        used = {w.local_rank for w in self._on(host)}
        local_rank = min(set(range(len(used) + 1)) - used)
        wid = self.next_id
        self.next_id += 1
        worker = _Worker(wid, host, local_rank, time.monotonic())
        self.workers[wid] = worker
        host.start(worker)
        return worker

    def live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.code is None]

    def _ended(self, w: _Worker) -> None:
        """Tell the survivors (constraint 5): ``gone/<id>`` spares them the wait for a peer they cannot see,
        ``ended`` lets generation 0 stop waiting for a worker that ended before it arrived."""
        try:
            self.store.set(f"shoal/el/gone/{w.wid}", "1")
            self.store.add("shoal/el/gone", 1)
            self.store.add("shoal/el/ended", 1)
        except RuntimeError:
            pass

    def poll(self) -> list[_Worker]:
        """Workers that ended since the last poll (and the workers of hosts lost since then)."""
        ended = []
        for host in self.hosts:
            if host.gone:
                continue
            for ev in host.poll():
                w = self.workers.get(int(ev.get("wid", -1)))
                if w is None or w.host is not host:
                    continue
                if ev.get("what") == "started":
                    w.pid, w.hostname = int(ev["pid"]), str(ev["host"])
                elif ev.get("what") == "ended" and w.code is None:
                    w.code = int(ev["code"])
                    w.stopped = w.stopped or bool(ev.get("stopped"))
                    w.failure = Failure(**ev["failure"]) if ev.get("failure") else None
                    ended.append(w)
            why = host.lost()
            if why is not None:
                ended += self._lose(host, why)
        for w in ended:
            self._ended(w)
        return ended

    def _lose(self, host: _Host, why: str) -> list[_Worker]:
        host.gone = True
        lost = self._on(host)
        if host.retiring and not lost:
            return []
        self.lost_hosts.append(host.name)
        print(f"shoal: host {format_host(host.name)} lost ({why}); its {len(lost)} worker(s) count as ended",
              file=sys.stderr, flush=True)
        for w in lost:
            w.code = EXIT_LAUNCHER
            w.failure = Failure(rank=w.wid, host=host.name, what=f"lost with host {format_host(host.name)}: {why}",
                                exitcode=EXIT_LAUNCHER, pid=w.pid, timestamp=time.time())
        return lost

    def stop(self, worker: _Worker, why: str) -> None:
        worker.host.stop(worker, why)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for host in self.hosts:
            if not host.gone:
                host.stop_all(sig)
        deadline = time.monotonic() + 2 * _STOP_GRACE_S
        while self.live() and time.monotonic() < deadline:
            self.poll()
            time.sleep(_POLL_S)
        for w in self.live():
            w.code = w.code if w.code is not None else -signal.SIGKILL

    # ------------------------------------------------------------------------------- the job's view
    def _members(self) -> Optional[list[str]]:
        """The latest generation's workers (``host:pid:id``), or None before the first."""
        try:
            if not self.store.check(["shoal/el/gen"]):
                return None
            gen = int(self.store.get("shoal/el/gen").decode())
            return json.loads(self.store.get(f"shoal/el/g{gen}/members").decode())["workers"]
        except (RuntimeError, ValueError):
            return None

    def evict_left_out(self, members: Optional[list[str]]) -> None:
        """Stop workers that joined a generation once and are left out of the latest (hung, constraint 7)."""
        if members is None:
            return
        in_gen = self._ids(members)
        for w in self.live():
            if w.wid in in_gen:
                w.was_member = True
            elif w.was_member and self._left(w):
                # It left on purpose and is on its way out: time to exit, then stopped like any other.
                w.leaving_since = w.leaving_since or time.monotonic()
                if time.monotonic() - w.leaving_since > _LEAVE_GRACE_S:
                    self.stop(w, f"it left the job but had not exited {_LEAVE_GRACE_S:.0f} s later")
            elif w.was_member:
                self.stop(w, "the other workers went on without it (hung, or too slow to come back)")

    def _left(self, w: _Worker) -> bool:
        """Whether worker ``w`` recorded that it left on purpose (shoal.core.membership.note_leave)."""
        if w.pid is None:
            return False
        try:
            return self.store.check([f"shoal/el/leave/{w.hostname}:{w.pid}:{w.wid}"])
        except RuntimeError:
            return False

    @staticmethod
    def _ids(members: list[str]) -> set[int]:
        return {int(w.rsplit(":", 1)[1]) for w in members if w.rsplit(":", 1)[1].isdigit()}

    def refresh_target(self) -> None:
        if not self.plan.discovery_script or time.monotonic() - self._discovered_at < _DISCOVERY_EVERY_S:
            return
        self._discovered_at = time.monotonic()
        try:
            if self.plan.hosts is None:
                slots = discover_slots(self.plan.discovery_script)
            else:
                slots = self._apply_discovery(discover_hosts(self.plan.discovery_script))
        except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s", exc)
            return
        self.target = max(self.plan.min_np, min(self.plan.max_np, slots))

    def _apply_discovery(self, found: list[tuple[str, int]]) -> int:
        """Hosts that appeared get an agent; hosts that left the list have their workers asked to leave
        (SIGTERM: they go at their next commit), and their agent is closed once they are gone. Returns the
        slots of the hosts that serve."""
        listed = dict(found)
        serving = {h.name: h for h in self.hosts if not h.gone and not h.retiring}
        for name, host in serving.items():
            if name not in listed:
                host.retiring = True
                print(f"shoal: host {format_host(name)} left the discovery script's output; its workers leave "
                      "at their next commit", file=sys.stderr, flush=True)
                for w in self._on(host):
                    host.stop(w, "its host left the host discovery script's output", leave=True)
            else:
                host.slots = listed[name]
        for name, slots in found:
            if name not in serving:
                print(f"shoal: host {format_host(name)} appeared in the discovery script's output ({slots} slots)",
                      file=sys.stderr, flush=True)
                self.add_host(name, slots)
        for host in self.hosts:  # a retired host with nobody left: its agent goes
            if host.retiring and not host.gone and not self._on(host) and isinstance(host, _RemoteHost):
                host.gone = True
                host.close(wait=False)
        return sum(h.slots for h in self.hosts if not h.gone and not h.retiring)

    # ------------------------------------------------------------------------------- the loop
    def run(self) -> int:
        for _ in range(self.plan.np):
            self.start_worker()
        finishing = False  # a worker ended its training: the job is ending, nobody is replaced any more
        while True:
            for w in self.poll():
                if w.code != 0 and w.failure is not None and not w.stopped:
                    self.failures.append(w.failure)
                elif w.code == 0:
                    w.left = self._left(w) or w.host.retiring
                    finishing = finishing or not w.left
            live = self.live()
            if not live:
                break
            members = self._members()
            self.evict_left_out(members)
            self.refresh_target()
            started = members is not None  # the first generation formed: the job runs
            if started and not finishing and len(live) < self.target:
                while len(self.live()) < self.target and self.restarts < self.plan.max_restarts and \
                        len(self.live()) < self.plan.max_np and self.free_host() is not None:
                    self.restarts += 1
                    worker = self.start_worker()
                    print(f"shoal: started worker {worker.wid} on {format_host(worker.host.name)} (replacement "
                          f"{self.restarts} of at most {self.plan.max_restarts}) to keep {self.target} workers",
                          file=sys.stderr, flush=True)
            members_alive = members is None or any(w.was_member or w.wid in self._ids(members)
                                                   for w in self.live())
            if finishing:  # the job ends: workers still waiting to join never will
                for w in self.live():
                    if not w.was_member and (members is None or w.wid not in self._ids(members)):
                        self.stop(w, "the job is ending: nothing left to join")
            if started and not finishing and not members_alive:
                print("shoal: every worker of the job's last generation has ended and nobody holds its state; "
                      "stopping the job", file=sys.stderr, flush=True)
                self.stop_all()
                break
            if len(self.live()) < self.plan.min_np and started and not finishing:
                lost = f"; hosts lost: {', '.join(map(format_host, self.lost_hosts))}" if self.lost_hosts else ""
                print(f"shoal: only {len(self.live())} workers left, below --min-np {self.plan.min_np}, and no "
                      f"replacement possible (no free slot, or --max-restarts {self.plan.max_restarts} used)"
                      f"{lost}; stopping the job", file=sys.stderr, flush=True)
                self.stop_all()
                break
            time.sleep(_POLL_S)
        return self.finish()

    def finish(self) -> int:
        ended_ok = [w.wid for w in self.workers.values() if w.code == 0]
        if self.failures and not ended_ok:
            return print_summary(self.failures, self.plan.np, self.plan.log_dir, [])
        if self.failures:
            shown = ", ".join(f"worker {f.rank} ({f.what})" for f in self.failures[:4])
            print(f"shoal: the elastic job ended: {len(ended_ok)} worker(s) finished; recovered from "
                  f"{len(self.failures)} failure(s): {shown}", file=sys.stderr, flush=True)
        return 0

    def close(self) -> None:
        for host in self.hosts:
            if isinstance(host, _RemoteHost):
                host.close(wait=False)
        for host in self.hosts:
            host.close()
        if self.log_root and not self.plan.log_dir:
            shutil.rmtree(self.log_root, ignore_errors=True)


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    # torch's process contexts log each worker's end at ERROR ("failed (exitcode: -9)"): the summary says it
    # once, in words; --verbose keeps them. torch sets a level on each of its loggers, so each is set by name.
    prefix = "torch.distributed.elastic"
    for name in [n for n in logging.root.manager.loggerDict if n.startswith(prefix)] + [prefix]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _line_buffered() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def run_elastic(plan: ElasticPlan, secret: str, verbose: bool = False) -> int:
    """Run an elastic job on this host or, with ``plan.hosts``, on several (constraints 1-8); returns the exit
    status: 0 when every worker ended well or the job recovered from its failures and finished, the root
    cause's otherwise, 128+N on signal N.

    Raises:
        ValueError: the store cannot listen at ``plan.master_addr`` (see :func:`shoal.runner.agent.open_store`).
    """
    _line_buffered()
    _env.export_job_secret(secret)
    launcher = _Launcher(plan, secret)  # imports torch's process machinery (and creates its loggers)
    _quiet(verbose)
    interrupted: list[int] = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415

    try:
        return launcher.run()
    except (KeyboardInterrupt, SignalException) as exc:
        # torch's start_processes installs its own SIGTERM/SIGINT handlers (raising SignalException).
        signum = int(getattr(exc, "sigval", 0)) or (interrupted[0] if interrupted else int(signal.SIGINT))
        launcher.stop_all()
        print(f"shoal: interrupted ({signal_name(signum)}); all workers stopped", file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        launcher.close()


# ------------------------------------------------------------------------------ the agent


class _StoreGone(Exception):
    pass


def serve_host(plan: dict, argv: list[str], secret: str) -> int:
    """A remote host's agent (constraint 3): start and stop this host's workers as the coordinator's commands
    in the job's store say, and report each one's start and end there. Ends when its stdin closes (the
    launch module's watcher sends SIGTERM), when the store stops answering (the coordinator is gone), or on
    an ``exit`` command; every worker it started is stopped first (constraint 7).

    Args:
        plan: the coordinator's JSON plan for this host (index, host, env, master address and port, ...).
        argv: the worker command, resolved on this host.
        secret: the job's secret, read from stdin.

    Returns:
        The agent's exit status: 0 after a clean stop, 1 when the store was lost.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415

    from . import agent as _agent  # noqa: PLC0415 (imports torch)

    def on_signal(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)  # until torch's start_processes installs its own (SignalException)
    _line_buffered()
    _env.export_job_secret(secret)
    index = int(plan["index"])
    log_root = plan.get("log_dir") or tempfile.mkdtemp(prefix="shoal-run-")
    os.makedirs(log_root, exist_ok=True)
    sentinel = Sentinel.start("shoal.runner.launch", None if plan.get("log_dir") else log_root)
    sentinel.job(plan["run_id"], index)
    env = dict(plan["env"])
    workers: Optional[_LocalWorkers] = None
    events = 0

    def key(name: str) -> str:
        return _HOST_KEY.format(index=index, name=name)

    def emit(store, record: dict) -> None:
        nonlocal events
        events += 1
        store.set(key(f"event/{events}"), json.dumps(record))
        store.add(key("events"), 1)

    stopped_by_store = kill_now = False
    try:
        store, _ = _agent.open_store(plan["master_addr"], int(plan["master_port"]), False, secret,
                                     float(plan["start_timeout_s"]))
        _quiet(bool(plan.get("verbose")))
        workers = _LocalWorkers(argv, env, plan["run_id"], index, plan["master_addr"], int(plan["master_port"]),
                                log_root, sentinel, int(plan["np"]), int(plan["min_np"]))
        seen = 0
        while True:
            try:
                count = int(store.add(key("cmds"), 0))
                commands = [json.loads(v.decode()) for v in
                            store.multi_get([key(f"cmd/{k}") for k in range(seen + 1, count + 1)])] \
                    if count > seen else []
            except RuntimeError as exc:
                raise _StoreGone(str(exc)) from None
            seen = count
            for c in commands:
                op = c.get("op")
                if op == "start":
                    pid = workers.start(int(c["wid"]), int(c["local_rank"]))
                    emit(store, {"what": "started", "wid": int(c["wid"]), "pid": pid, "host": socket.gethostname()})
                elif op == "stop" and int(c["wid"]) in workers.procs:
                    workers.stop(int(c["wid"]), str(c.get("why", "")), bool(c.get("leave")))
                elif op == "stop_all":
                    workers.stop_all(int(c.get("sig", signal.SIGTERM)))
            for wid, code, failure, stopped in workers.poll():
                emit(store, {"what": "ended", "wid": wid, "code": code, "stopped": stopped,
                             "failure": dataclasses.asdict(failure) if failure else None})
            time.sleep(_POLL_S)
    except (KeyboardInterrupt, SignalException):
        # stdin closed. The coordinator closes it once this host's workers are gone, or after stop_all: a worker
        # still here means the coordinator died, and the job's store with it; nothing is left to leave for.
        kill_now = True
    except _StoreGone as exc:
        stopped_by_store = True
        print(f"shoal: agent on {socket.gethostname()}: the job's store stopped answering ({exc}); stopping this "
              "host's workers", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the coordinator's escalation must not cut this short
        if workers is not None:
            workers.stop_all(signal.SIGKILL if kill_now or stopped_by_store else signal.SIGTERM)
        sentinel.done()
        if not plan.get("log_dir"):
            shutil.rmtree(log_root, ignore_errors=True)
    return 1 if stopped_by_store else 0
