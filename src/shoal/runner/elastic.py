"""``shoal run`` in elastic mode (``--min-np`` / ``--max-np`` / ``--host-discovery-script``): the job goes on
when workers die, leave or hang, and new workers join it.

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
2. The store lives here, bound to loopback (one host) and keyed under the job's secret
   (:mod:`shoal.runner.agent`), so it outlives every worker; the workers are clients.
3. Nothing is left behind: the sentinel (:mod:`shoal.runner.sentinel`) knows every worker, including
   replacements, and stops them if the launcher dies; a hung worker the others evicted is stopped by the
   launcher (SIGTERM, then SIGKILL after ``_STOP_GRACE_S``).
4. Bounded: at most ``--max-restarts`` replacements per job, so a worker that fails at start cannot make
   the launcher loop; below ``--min-np`` live workers with no replacement possible, the job fails.

Worker ids: the launcher numbers workers 0, 1, ... in the order it starts them; the first ``-np`` are the
first generation's ranks (their output lines carry ``[rank<id>]``), replacements get the next ids.

What lives elsewhere: the non-elastic launcher (:mod:`shoal.runner.launch`), the agreement
(:mod:`shoal.core.membership`), the failure report (:mod:`shoal.runner.report`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from shoal.core import env as _env

from .report import EXIT_LAUNCHER, Failure, failure_from_torch, print_summary, signal_name
from .sentinel import Sentinel

__all__ = ["ElasticPlan", "run_elastic", "discover_slots"]

log = logging.getLogger(__name__)

_POLL_S = 0.1
#: How often the host discovery script runs (Horovod's driver polls it every second too).
_DISCOVERY_EVERY_S = 1.0
#: SIGTERM first, SIGKILL after this long, when the launcher stops a worker.
_STOP_GRACE_S = 3.0


@dataclass(slots=True)
class ElasticPlan:
    """What the elastic launcher needs (one host)."""

    argv: list[str]                 # the worker command (through the shim)
    np: int                         # workers at the start, and the target while the job runs
    min_np: int
    max_np: int
    env: dict[str, str] = field(default_factory=dict)
    discovery_script: Optional[str] = None
    max_restarts: int = 10
    log_dir: Optional[str] = None
    start_timeout_s: float = 120.0
    module: str = "shoal.runner.launch"


_LEAVE_GRACE_S = 30.0   # a worker that left on purpose has this long to exit before it is stopped


@dataclass(slots=True)
class _Worker:
    wid: int
    context: Any                    # torch's PContext of this one process
    logs: Any
    pid: int
    started: float
    code: Optional[int] = None
    failure: Optional[Failure] = None
    was_member: bool = False        # it was in some generation (then left out of a later one: evicted)
    left: bool = False              # it ended 0 after leaving on purpose (SIGTERM), not by finishing
    stopped: bool = False           # the launcher stopped it (evicted, or a joiner the job no longer needs)
    leaving_since: Optional[float] = None  # left out of the latest generation after it recorded a leave


def discover_slots(script: str) -> int:
    """Slots for this host from a host discovery script (Horovod's contract: ``host:slots`` lines, or
    ``host`` for one slot); hosts other than this one are not used by the one-host launcher.

    Raises:
        ValueError: the script failed or printed a line that does not parse.
    """
    proc = subprocess.run([script], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ValueError(f"shoal: host discovery script {script!r} exited with {proc.returncode}: "
                         f"{proc.stderr.strip()[:200]}")
    me = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    slots = 0
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        host, _, count = line.rpartition(":") if ":" in line else (line, "", "1")
        if not count.isdigit():
            raise ValueError(f"shoal: host discovery script {script!r} printed {line!r}. HINT: print "
                             "'host:slots' lines.")
        if host in me:
            slots += int(count)
    return slots


class _Launcher:
    def __init__(self, plan: ElasticPlan, secret: str):
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std  # noqa: PLC0415

        from . import agent as _agent  # noqa: PLC0415 (imports torch)

        self.plan = plan
        self.secret = secret
        self.run_id = secrets.token_hex(16)
        self.log_root = plan.log_dir or tempfile.mkdtemp(prefix="shoal-run-")
        os.makedirs(self.log_root, exist_ok=True)
        self.sentinel = Sentinel.start(plan.module, None if plan.log_dir else self.log_root)
        self.sentinel.job(self.run_id, 0)
        self.store, self.port = _agent.open_store("127.0.0.1", 0, True, secret, plan.start_timeout_s)
        self._specs = (DefaultLogsSpecs, Std)
        self.workers: dict[int, _Worker] = {}
        self.next_id = 0
        self.restarts = 0
        self.failures: list[Failure] = []
        self.recovered: list[Failure] = []
        self.target = plan.np
        self._discovered_at = 0.0

    # ------------------------------------------------------------------------------- workers
    def start_worker(self) -> _Worker:
        from torch.distributed.elastic.multiprocessing import start_processes  # noqa: PLC0415

        logs_specs_cls, std = self._specs
        wid = self.next_id
        self.next_id += 1
        env = _env.child_environ({**self.plan.env,
               "SHOAL_ELASTIC": "1", "SHOAL_ELASTIC_ID": str(wid), "SHOAL_ELASTIC_NP": str(self.plan.np),
               "SHOAL_ELASTIC_MIN_NP": str(self.plan.min_np), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(self.port), "TORCHELASTIC_RUN_ID": self.run_id, "GROUP_RANK": "0",
               "TORCHELASTIC_RESTART_COUNT": "0", "LOCAL_RANK": str(wid % max(self.plan.max_np, 1))})
        logs = logs_specs_cls(log_dir=os.path.join(self.log_root, f"worker{wid}"), tee=std.ALL)
        context = start_processes(name="worker", entrypoint=self.plan.argv[0], args={0: tuple(self.plan.argv[1:])},
                                  envs={0: env}, logs_specs=logs, log_line_prefixes={0: f"[rank{wid}]: "},
                                  start_method="spawn")
        pid = next(iter(context.pids().values()))
        self.sentinel.watch([pid])
        worker = _Worker(wid, context, logs, pid, time.monotonic())
        self.workers[wid] = worker
        return worker

    def live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.code is None]

    def poll(self) -> list[_Worker]:
        """Workers that ended since the last poll."""
        ended = []
        for w in self.live():
            result = w.context.wait(0)
            if result is None:
                continue
            failures = getattr(result, "failures", {}) or {}
            if failures:
                pf = next(iter(failures.values()))
                w.code = pf.exitcode
                w.failure = failure_from_torch(w.wid, pf, None, socket.gethostname())
            else:
                w.code = 0
            w.context.close()
            ended.append(w)
            try:  # generation 0 stops waiting for a worker that ended before it arrived (membership.enter)
                self.store.add("shoal/el/ended", 1)
            except RuntimeError:
                pass
        return ended

    def ended_on_its_own(self, worker: _Worker) -> bool:
        """Whether ``worker`` ended, or is exiting, by itself: then its own exit status is the story (the next
        :meth:`poll` records it) and the launcher does not stop it. The survivors of a SIGKILL count a peer
        as gone as soon as it is exiting (its sockets close before it turns zombie) and form their next
        generation in milliseconds, often before that poll: the worker then looked evicted and its failure
        was left out of the summary (1 run in ~30 of a killed worker on a loaded 2-core machine)."""
        from shoal.core.runtime import _is_dead  # noqa: PLC0415 (the workers' liveness rule, membership's too)

        if worker.context.wait(0) is not None:
            return True
        if not _is_dead(worker.pid):
            return False
        deadline = time.monotonic() + _STOP_GRACE_S  # exiting: the kernel finishes it within milliseconds
        while time.monotonic() < deadline:
            if worker.context.wait(0) is not None:
                return True
            time.sleep(0.02)
        return False

    def stop(self, worker: _Worker, why: str) -> None:
        if self.ended_on_its_own(worker):
            return
        print(f"shoal: stopping worker {worker.wid} (pid {worker.pid}): {why}", file=sys.stderr, flush=True)
        worker.stopped = True
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < deadline and worker.context.wait(0) is None:
            time.sleep(0.05)
        if worker.context.wait(0) is None:
            worker.context.close(death_sig=signal.SIGKILL)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for w in self.live():
            try:
                os.kill(w.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _STOP_GRACE_S
        while any(w.context.wait(0) is None for w in self.live()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for w in self.live():
            w.context.close(death_sig=signal.SIGKILL)
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
        """Stop workers that joined a generation once and are left out of the latest (hung, constraint 3)."""
        if members is None:
            return
        in_gen = {int(w.rsplit(":", 1)[1]) for w in members if w.rsplit(":", 1)[1].isdigit()}
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
        try:
            return self.store.check([f"shoal/el/leave/{socket.gethostname()}:{w.pid}:{w.wid}"])
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
            slots = discover_slots(self.plan.discovery_script)
        except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s", exc)
            return
        self.target = max(self.plan.min_np, min(self.plan.max_np, slots))

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
                    w.left = self._left(w)
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
                        len(self.live()) < self.plan.max_np:
                    self.restarts += 1
                    worker = self.start_worker()
                    print(f"shoal: started worker {worker.wid} (replacement {self.restarts} of at most "
                          f"{self.plan.max_restarts}) to keep {self.target} workers", file=sys.stderr, flush=True)
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
                print(f"shoal: only {len(self.live())} workers left, below --min-np {self.plan.min_np}, and no "
                      "replacement possible; stopping the job", file=sys.stderr, flush=True)
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
        self.sentinel.done()
        if not self.plan.log_dir:
            shutil.rmtree(self.log_root, ignore_errors=True)


def run_elastic(plan: ElasticPlan, secret: str, verbose: bool = False) -> int:
    """Run an elastic job on this host (constraints 1-4); returns the exit status: 0 when every worker
    ended well or the job recovered from its failures and finished, the root cause's otherwise, 128+N on
    signal N."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    _env.export_job_secret(secret)
    launcher = _Launcher(plan, secret)  # imports torch's process machinery (and creates its loggers)
    if not verbose:
        # torch's process contexts log each worker's end at ERROR ("failed (exitcode: -9)"): the summary
        # says it once, in words; --verbose keeps them. torch sets a level on each of its loggers, so each
        # is set here by name.
        prefix = "torch.distributed.elastic"
        for name in [n for n in logging.root.manager.loggerDict if n.startswith(prefix)] + [prefix]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
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
