"""What ``shoal run`` says when a run fails: each rank's failure, the rank to blame, the summary.

Design constraints:

1. Name the rank the ranks named. A rank that waited for a busy, hung or departed peer fails too,
   often first, so "first to fail" blames the victim. Shoal's errors carry their verdict as fields
   (:attr:`shoal.core.errors.ShoalError.culprit_ranks`); the worker shim writes them beside the message
   in torch's per-worker error file (``extraInfo["shoal"]``, :func:`record_exception`), and the summary
   reads the fields, never the message text.
2. What the launcher knows itself comes first: a rank's own exception or signal, and whether the named
   rank exited 0 (then it left while its peers still waited for it: "exited normally").
3. Errors that carry no fields (a plain torch script, a non-Python command) fall back to the old
   order: failed on its own before failed because a peer went away (gloo's words for that), before
   stopped by the agent; earliest first.

What lives elsewhere: running the agents and collecting torch's ``ProcessFailure`` records
(:mod:`shoal.runner.launch`), the errors themselves (:mod:`shoal.core.errors`). Imports no torch at
import time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, TextIO

from shoal.core import env as _env

__all__ = ["Failure", "Verdict", "blame", "failure_from_torch", "print_summary", "exit_status",
           "record_exception", "signal_name", "EXIT_LAUNCHER", "ERROR_FIELDS_KEY"]

EXIT_LAUNCHER = 1  #: the launch itself failed (rendezvous, remote command) with no rank to blame

#: Key of Shoal's fields inside ``extraInfo`` of torch's error file.
ERROR_FIELDS_KEY = "shoal"

# Fallback only (constraint 3): words of torch/gloo errors that a rank raises when a *peer* went away,
# for errors without Shoal's fields (a plain torch.distributed script under shoal run).
_COLLATERAL_WORDS = ("closed by peer", "reset by peer", "Broken pipe", "ECONNRESET", "Connection refused")


#: How many further lines of a multi-line error the summary shows under its first.
_DETAIL_LINES = 6


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(slots=True)
class Failure:
    """One failed rank (or, with ``rank`` None, an agent that failed before its ranks ran).

    JSON-serializable (``dataclasses.asdict``): remote agents send it to the coordinator.
    """

    rank: Optional[int]
    host: str
    what: str  # one line: "ZeroDivisionError: division by zero", "killed by SIGKILL (signal 9)"
    exitcode: int = 1  # negative: killed by that signal (Popen's convention)
    pid: Optional[int] = None
    timestamp: float = 0.0
    stopped: bool = False  # SIGTERM'd by an agent after another rank failed
    #: Fallback classification (constraint 3): an error that is not Shoal's, in gloo's words for a peer
    #: gone away.
    collateral: bool = False
    #: From the error file's Shoal fields (constraint 1): the exception's class, and the ranks it named.
    error_type: str = ""
    culprit_ranks: list[int] = field(default_factory=list)
    #: The message's next lines, when it has several (a MismatchError lists what each rank submitted).
    detail: list[str] = field(default_factory=list)

    def sort_key(self) -> tuple:
        return (self.stopped, self.collateral, self.timestamp,
                self.rank if self.rank is not None else -1)

    def who(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"agent on host {self.host}"


@dataclass(slots=True)
class Verdict:
    """Who is to blame, and on whose word."""

    root: Failure  # the culprit's own failure, or (culprit failed on no account of its own) the first namer's
    culprit: Optional[int]  # the global rank to blame; None: an agent with no rank
    own_failure: bool  # the culprit failed on its own (its exception or signal is the root cause)
    namers: list[Failure]  # the failures whose fields named the culprit (not the culprit's own)
    exited_ok: bool  # the culprit exited 0 while others waited for it


# ------------------------------------------------------------------------------- worker side


def record_exception(exc: BaseException) -> None:
    """Write ``exc`` into torch's error file (``TORCHELASTIC_ERROR_FILE``) with Shoal's fields.

    torch's :class:`~torch.distributed.elastic.multiprocessing.errors.ErrorHandler` writes
    ``{"message": {"message": "Type: text", "extraInfo": {"py_callstack", "timestamp"}}}``; this adds
    ``extraInfo["shoal"] = {"type", "shoal_error", "culprit_ranks", "time"}`` (``shoal_error``: a
    :class:`~shoal.core.errors.ShoalError`, whose ``culprit_ranks`` are its verdict; ``time`` to the
    microsecond, torch's timestamp has whole seconds). Called by the
    worker shim, inside its ``except`` block.
    """
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # noqa: PLC0415
    except ImportError:  # no torch in this interpreter: the stderr fallback will do
        return
    from shoal.core.errors import ShoalError  # noqa: PLC0415 (no torch import)

    handler = ErrorHandler()
    handler.record_exception(exc)
    path = _env.get_env("TORCHELASTIC_ERROR_FILE")
    if not path or not os.path.isfile(path):
        return
    is_shoals = isinstance(exc, ShoalError)
    culprits = list(exc.culprit_ranks) if is_shoals else []
    try:
        with open(path) as fh:
            data = json.load(fh)
        data["message"]["extraInfo"][ERROR_FIELDS_KEY] = {
            "type": type(exc).__name__, "shoal_error": is_shoals, "culprit_ranks": [int(r) for r in culprits],
            "time": time.time()}
        # Same file, same directory: torch's agent reads it only after this process has exited.
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "x") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # torch's record stands; the summary falls back to the message (constraint 3)


# ------------------------------------------------------------------------------- agent side


def _last_line(path: Optional[str]) -> str:
    """Last non-empty line of a worker's stderr log (the fallback when there is no error file)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as fh:
        lines = [ln.strip() for ln in fh.read()[-8192:].splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def failure_from_torch(rank: int, pf: Any, stderr_log: Optional[str], host: str) -> Failure:
    """Turn torch's ``ProcessFailure`` into a :class:`Failure` (error file first, then the log)."""
    message = pf.message.get("message", "") if isinstance(pf.message, dict) else str(pf.message or "")
    from_error_file = isinstance(pf.message, dict) and bool(message)
    fields = {}
    if from_error_file:
        extra = pf.message.get("extraInfo") or {}
        fields = extra.get(ERROR_FIELDS_KEY) or {} if isinstance(extra, dict) else {}
    first = message.strip().splitlines()[0] if message.strip() else ""
    if pf.exitcode < 0:
        killed = f"killed by {signal_name(-pf.exitcode)} (signal {-pf.exitcode})"
        # A rank that raised and then died at exit (gloo aborting in teardown) keeps its exception.
        what = f"{first} (then {killed})" if from_error_file and first else killed
    elif from_error_file:
        what = first or f"exit code {pf.exitcode}"
    else:
        line = _last_line(stderr_log)
        what = f"exit code {pf.exitcode}" + (f": {line}" if line else "")
    culprits = [int(r) for r in fields.get("culprit_ranks", []) if isinstance(r, int)]
    rest = [ln.strip() for ln in message.strip().splitlines()[1:] if ln.strip()] if from_error_file else []
    detail = rest[:_DETAIL_LINES] + ([f"... {len(rest) - _DETAIL_LINES} more line(s) in the rank's output"]
                                     if len(rest) > _DETAIL_LINES else [])
    return Failure(rank=rank, host=host, what=what, exitcode=pf.exitcode, pid=pf.pid, detail=detail,
                   timestamp=float(fields.get("time") or pf.timestamp),
                   stopped=pf.exitcode == -signal.SIGTERM,
                   collateral=not fields.get("shoal_error") and any(w in what for w in _COLLATERAL_WORDS),
                   error_type=str(fields.get("type", "")), culprit_ranks=culprits)


# ------------------------------------------------------------------------------------ blame


def blame(failures: list[Failure], exited_ok: Iterable[int] = ()) -> Verdict:
    """Choose the rank to blame (constraints 1-3).

    Args:
        failures: every failed rank of the run (and agents that failed with no rank).
        exited_ok: global ranks known to have exited with code 0.

    Returns:
        The :class:`Verdict`: the rank most often named by the others' fields (ties: named first, then
        the lower rank); with no names, the first of the fallback order.

    Example:
        >>> blame([Failure(rank=0, host="h", what="StallError: ...", culprit_ranks=[1])], exited_ok=[1])
        Verdict(root=..., culprit=1, own_failure=False, namers=[...], exited_ok=True)
    """
    if not failures:
        raise ValueError("shoal: blame() needs at least one failure")
    ordered = sorted(failures, key=Failure.sort_key)
    by_rank = {f.rank: f for f in failures if f.rank is not None}
    votes: Counter = Counter()
    first_named: dict[int, float] = {}
    for f in sorted((f for f in failures if not f.stopped), key=lambda f: f.timestamp):
        for r in f.culprit_ranks:
            votes[r] += 1
            first_named.setdefault(r, f.timestamp)
    if not votes:
        root = ordered[0]
        return Verdict(root=root, culprit=root.rank, own_failure=True, namers=[], exited_ok=False)
    culprit = min(votes, key=lambda r: (-votes[r], first_named[r], r))
    namers = [f for f in ordered if culprit in f.culprit_ranks and f.rank != culprit and not f.stopped]
    own = by_rank.get(culprit)
    # Its own failure is the cause unless it too only waited for someone (its error names another rank).
    if own is not None and not own.stopped and set(own.culprit_ranks) <= {culprit}:
        return Verdict(root=own, culprit=culprit, own_failure=True, namers=namers, exited_ok=False)
    return Verdict(root=namers[0] if namers else ordered[0], culprit=culprit, own_failure=False,
                   namers=namers, exited_ok=own is None and culprit in set(exited_ok))


def exit_status(root: Failure) -> int:
    """``shoal run``'s status for this root failure: its exit code, or 128+N for signal N."""
    if root.exitcode < 0:
        return 128 + (-root.exitcode)
    return root.exitcode or EXIT_LAUNCHER


def _ranks_text(fs: list[Failure]) -> str:
    ranks = [f.rank for f in fs]
    return (f"rank {ranks[0]}" if len(ranks) == 1
            else "ranks " + ", ".join(str(r) for r in ranks))


def print_summary(failures: list[Failure], world_size: int, log_dir: Optional[str],
                  exited_ok: Iterable[int] = (), out: TextIO | None = None) -> int:
    """Print the failure report, the root cause first, on one line; return the exit status.

    Example output::

        shoal: rank 1 is the root cause: named by rank 0 (StallError: shoal: rank 0 has waited 3 s ...)
        shoal:   rank 1 was still running when shoal stopped it
        shoal: 1 of 2 ranks failed; exit status 1. HINT: the root cause is rank 1: ...
    """
    out = out or sys.stderr
    v = blame(failures, exited_ok)
    root = v.root
    shown = {id(root)}
    if v.own_failure or v.culprit is None:
        print(f"shoal: {root.who()} failed: {root.what}", file=out)
    else:
        print(f"shoal: rank {v.culprit} is the root cause: named by {_ranks_text(v.namers or [root])} "
              f"({root.what})", file=out)
    for line in root.detail:
        print(f"shoal:     {line}", file=out)
    if not (v.own_failure or v.culprit is None):
        waiters = _ranks_text(v.namers or [root])
        if v.exited_ok:
            print(f"shoal:   rank {v.culprit} exited normally (code 0) while {waiters} still waited for it",
                  file=out)
        elif any(f.rank == v.culprit and f.stopped for f in failures):
            print(f"shoal:   rank {v.culprit} was still running when shoal stopped it", file=out)
            shown |= {id(f) for f in failures if f.rank == v.culprit}
    blamed = f"rank {v.culprit}" if v.culprit is not None else root.who()
    for f in sorted(failures, key=Failure.sort_key):
        if id(f) in shown:
            continue
        what = f"stopped by shoal after {blamed} failed" if f.stopped else f.what
        print(f"shoal:   then {f.who()}: {what}", file=out)
    ranks = sorted({f.rank for f in failures if f.rank is not None and not f.stopped})
    code = exit_status(root)
    if root.rank is None:
        print(f"shoal: the launch failed on host {root.host} before its ranks could run; exit status "
              f"{code}. HINT: check the messages above: the remote command, the rendezvous address "
              "(--master-addr/--master-port reachable from every host), the command on that host's "
              "PATH.", file=out, flush=True)
        return code
    where = f"logs in {log_dir}" if log_dir else "rerun with --log-dir DIR to keep each rank's logs"
    print(f"shoal: {len(ranks)} of {world_size} ranks failed; exit status {code}. HINT: the root "
          f"cause is {blamed}: its output above carries the prefix [rank{v.culprit}]; {where}.",
          file=out, flush=True)
    return code
