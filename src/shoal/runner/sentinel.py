"""The sentinel: stops an agent's ranks when the agent dies without stopping them itself.

torch's agent stops its workers on SIGTERM, SIGINT and on any worker failure, but SIGKILL (the OOM
killer, a scheduler's hard kill, ``timeout -k``) ends it with no chance to do so; its workers run in
sessions of their own (torch's ``SubprocessHandler`` starts them with ``start_new_session=True``), so
nothing reaches them: measured before this module, both ranks of a 2-rank job, re-parented to PID 1,
kept training for over 100 s after ``kill -9`` of ``shoal run``, and its temporary directory stayed.

Design constraints:

1. Outlive the agent, cost nothing while it lives. The sentinel is a small process of its own (no
   torch import), started by the agent before any worker, in a session of its own (so that a signal
   to the launcher's process group or terminal does not take it down with the agent). It blocks on
   the read end of a pipe whose only write end the agent holds (not inherited by the workers: pipes
   are created non-inheritable and torch starts workers with ``close_fds``). The kernel closes that
   end however the agent dies; the sentinel sees EOF at once: no polling, no timer.
2. Kill only what the agent started, all of it. The agent names its job first (torch's run id,
   random per job, and its node's group rank: every worker and every child of a worker inherits
   ``TORCHELASTIC_RUN_ID`` and ``GROUP_RANK`` from torch), then each worker's pid as it starts. At
   the end the sentinel takes the workers it was told about plus every process whose environment
   carries both values (so a worker that started, or forked, a moment before the agent died is not
   missed: measured, a fast ``sh -c`` rank printed and was orphaned before its pid could be sent).
   It holds a pidfd for each, so a pid reused after a process's death is never signalled, and
   signals each process and, for a group leader, its process group. A clean end is announced
   (``done``) and kills nothing.
3. Fast and bounded: SIGTERM, then SIGKILL to what is left after ``GRACE_S``; the whole stop
   stays within the 5 s target (ranks gone within 5 s of the launcher's death).
4. Leave nothing behind: then remove the agent's temporary log directory, and say on the agent's
   stderr what happened (the launcher could not), when there was a rank to stop.

Protocol on the pipe (agent -> sentinel), one line each: ``job RUN_ID GROUP_RANK`` first, ``pid N``
for every worker, ``done`` at a clean end. Entry: ``python -m shoal.runner.launch --sentinel AGENT_PID [TEMP_DIR]``.

What lives elsewhere: the agent (:mod:`shoal.runner.launch`).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Iterable, Optional

__all__ = ["Sentinel", "sentinel_main", "GRACE_S"]

#: SIGTERM first (a rank may flush its logs), SIGKILL after this long.
GRACE_S = 2.0
_TEMP_PREFIX = "shoal-run-"


class Sentinel:
    """The agent's end: start the sentinel, tell it each worker, and say ``done`` at a clean end.

    Example:
        >>> s = Sentinel.start(module="shoal.runner.launch", temp_dir="/tmp/shoal-run-x")
        >>> s.job(run_id, group_rank=0)  # before any worker starts
        >>> s.watch([4242, 4243])   # as workers start
        >>> s.done()                # after the agent stopped them itself
    """

    def __init__(self, proc: Optional[subprocess.Popen], write_fd: Optional[int]):
        self._proc = proc
        self._fd = write_fd

    @classmethod
    def start(cls, module: str, temp_dir: Optional[str]) -> "Sentinel":
        """Start the sentinel process (constraint 1). On failure, log nothing and watch nothing:
        the run goes on as before this module (torch's own handling of every other signal holds)."""
        read_fd, write_fd = os.pipe()  # both non-inheritable (PEP 446)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "--sentinel", str(os.getpid()), temp_dir or ""],
                stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            os.close(write_fd)
            return cls(None, None)
        finally:
            os.close(read_fd)
        return cls(proc, write_fd)

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (line + "\n").encode())
        except OSError:  # the sentinel is gone: nothing more it can do for us
            os.close(self._fd)
            self._fd = None

    def job(self, run_id: str, group_rank: int) -> None:
        """Name the job (constraint 2): processes carrying both values in their environment are its."""
        self._send(f"job {run_id} {int(group_rank)}")

    def watch(self, pids: Iterable[int]) -> None:
        """Register workers (constraint 2): they are stopped if this process dies before :meth:`done`."""
        for pid in pids:
            self._send(f"pid {int(pid)}")

    def done(self) -> None:
        """A clean end (the agent stopped or reaped its workers): the sentinel exits, killing nothing."""
        self._send("done")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# --------------------------------------------------------------------------- sentinel process


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # already gone, or a kernel without pidfds (< 5.3)
        return None


def _alive(pidfd: int) -> bool:
    # A pidfd polls readable once its process has exited (pidfd_open(2)).
    return not select.select([pidfd], [], [], 0)[0]


def _environ_has(pid: int, needles: frozenset[bytes]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needles <= set(fh.read().split(b"\0"))
    except OSError:  # gone, or not ours to read
        return False


def _job_processes(needles: frozenset[bytes], known: dict[int, int]) -> dict[int, int]:
    """Processes whose environment carries the job's values, each with a pidfd (constraint 2)."""
    found = {}
    if not needles:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in known or int(entry) == me:
            continue
        pid = int(entry)
        if _environ_has(pid, needles):
            fd = _pidfd(pid)
            if fd is not None and _environ_has(pid, needles):  # still the same process
                found[pid] = fd
    return found


def _signal(targets: dict[int, int], signum: int) -> None:
    for pid, pidfd in targets.items():
        if not _alive(pidfd):
            continue
        try:
            signal.pidfd_send_signal(pidfd, signum)
            # A worker leads its own session (torch starts it so): its group holds its children,
            # also those that dropped the job's variables. The pidfd shows the leader alive, so the
            # group id is still its own.
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError, AttributeError, OSError):
            pass


def sentinel_main(agent_pid: int, temp_dir: str) -> int:
    """The sentinel process: wait for the agent's end, and clean up unless it was clean."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session, but a stray Ctrl-C must not win
    pids: dict[int, int] = {}
    needles: frozenset[bytes] = frozenset()
    buf = b""
    clean = False
    while True:
        try:
            chunk = os.read(0, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            word, *args = line.decode(errors="replace").split()
            if word == "pid" and args and args[0].isdigit():
                fd = _pidfd(int(args[0]))
                if fd is not None:
                    pids[int(args[0])] = fd
            elif word == "job" and len(args) == 2:
                needles = frozenset({f"TORCHELASTIC_RUN_ID={args[0]}".encode(), f"GROUP_RANK={args[1]}".encode()})
            elif word == "done":
                clean = True
    if clean:
        return 0
    targets = {**pids, **_job_processes(needles, pids)}
    targets = {p: fd for p, fd in targets.items() if _alive(fd)}
    stopped = sorted(targets)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(fd) for fd in targets.values()):
        time.sleep(0.05)
    _signal(targets, signal.SIGKILL)
    # Anything of the job forked meanwhile (a rank's child started during the grace period).
    late = _job_processes(needles, targets)
    _signal(late, signal.SIGKILL)
    removed = ""
    if temp_dir and os.path.basename(temp_dir).startswith(_TEMP_PREFIX) and os.path.isdir(temp_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)
        removed = f" and removed {temp_dir}"
    if not stopped and not late:
        return 0  # it died before any rank ran (e.g. stopped during the rendezvous): nothing to say
    try:
        print(f"shoal: the launcher's agent on {socket.gethostname()} (pid {agent_pid}) died without "
              f"stopping its ranks; the sentinel stopped {len(stopped) + len(late)} process(es) of its job "
              f"({', '.join(map(str, stopped + sorted(late)))}){removed}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the launcher's stderr went with it
        pass
    return 0
