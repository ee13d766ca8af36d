"""Fixtures for launcher tests: run the real ``shoal`` command, never leave a process behind.

``subprocess.run(timeout=)`` alone would leave workers running: torch's agent starts every worker
in its own session, out of reach of a process-group kill. So each run carries a unique marker
variable that every descendant inherits (workers, agents in namespaces), and after the run, on
timeout or not, every process whose environment holds the marker is killed. A run that leaves one
behind fails its test: the launcher must clean up after itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest

__all__ = ["CliResult", "run_cli"]

# Not SHOAL_*: shoal.init() warns about SHOAL_* names it does not know.
_MARK = "LAUNCHER_TEST_RUN_MARK"
_BIN = os.path.dirname(sys.executable)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    #: time.time() when the process exited (tests compare it with times the ranks print)
    ended_at: float
    #: seconds from the launcher's exit until none of its processes was left (0.0: none was left)
    drained_s: float = 0.0

    def shoal_lines(self) -> list[str]:
        """The launcher's own report lines (``shoal: ...``), in order."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("shoal")]

    def describe(self) -> str:
        return (f"exit {self.returncode} after {self.duration_s:.1f} s\n--- stdout ---\n{self.stdout}"
                f"\n--- stderr ---\n{self.stderr}")


def _cli_argv() -> list[str]:
    script = os.path.join(_BIN, "shoal")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "shoal.runner.cli"]


def _marked_pids(marker: str) -> list[int]:
    needle = f"{_MARK}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_marked(marker: str) -> list[int]:
    pids = _marked_pids(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def run_cli(args: Sequence[str], timeout_s: float = 60.0, env: Optional[dict[str, str]] = None,
            interrupt_on: Optional[str] = None, interrupt_signal: int = signal.SIGINT,
            on_stdout: Optional[Callable[[str], None]] = None, settle_s: float = 2.0,
            prefix: Sequence[str] = ()) -> CliResult:
    """Run ``shoal <args>`` in its own session and return what it printed.

    Args:
        args: arguments after ``shoal``, e.g. ``["run", "-np", "2", "python", "-c", "..."]``.
        timeout_s: the test fails (and everything is killed) after this long.
        env: extra variables for the command.
        interrupt_on: send ``interrupt_signal`` (default SIGINT, Ctrl-C) to the launcher once this
            text appears on its stdout.
        on_stdout: called with each stdout line as it comes (from a reader thread); an exception
            it raises fails the test after the run.
        settle_s: how long the launcher's processes may take to go after it exited; any left then
            is a leak.
        prefix: words before the command, e.g. ``["ip", "netns", "exec", "ns0"]`` to launch from inside a
            network namespace (it must exec the command: signals go to its pid).
    """
    marker = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), _MARK: marker,
                "PATH": _BIN + os.pathsep + os.environ.get("PATH", "")}  # `python` = this venv's
    t0 = time.monotonic()
    proc = subprocess.Popen([*prefix, *_cli_argv(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=full_env, start_new_session=True)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    seen = threading.Event()
    callback_errors: list[BaseException] = []

    def _read(stream, key: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            chunks[key].append(line)
            if key == "out" and on_stdout is not None and not callback_errors:
                try:
                    on_stdout(line)
                except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
                    callback_errors.append(exc)
            if interrupt_on and key == "out" and interrupt_on in line and not seen.is_set():
                seen.set()
                os.kill(proc.pid, interrupt_signal)

    readers = [threading.Thread(target=_read, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=_read, args=(proc.stderr, "err"), daemon=True)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        ended_at = time.time()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Give an exiting launcher's last children a moment, then anything left is a leak.
        exited = time.monotonic()
        deadline = exited + settle_s
        drained_s = 0.0
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
            drained_s = time.monotonic() - exited
        leaked = _kill_marked(marker)
        for t in readers:
            t.join(timeout=5)
    result = CliResult(proc.returncode, "".join(chunks["out"]), "".join(chunks["err"]),
                       time.monotonic() - t0, ended_at, drained_s)
    if callback_errors:
        raise callback_errors[0]
    if timed_out:
        pytest.fail(f"shoal did not finish within {timeout_s} s (killed):\n{result.describe()}")
    if leaked:
        pytest.fail(f"shoal left {len(leaked)} process(es) running: {leaked}\n{result.describe()}")
    return result


@pytest.fixture(name="run_cli")
def _run_cli_fixture():
    """The :func:`run_cli` helper, as a fixture."""
    return run_cli
