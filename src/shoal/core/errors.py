"""Shoal's exceptions. Every message names what failed (tensor, rank) and ends with a HINT for the fix.

The errors about other ranks carry what they say as fields, so that nothing has to parse their text: the
frontends, the stall inspector and the launcher's summary read ``culprit_ranks`` (the ranks named as the
root cause), ``dead_ranks``, ``missing_ranks`` and ``timed_out``. The text is rendered once, from those
fields, where the error is made.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

__all__ = [
    "ShoalError",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "NotInitializedError",
    "MismatchError",
    "RankFailureError",
    "StallError",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "format_ranks",
    "shown",
]


def _ranks(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({int(r) for r in values}))


class ShoalError(RuntimeError):
    """Base class of every error Shoal raises on purpose.

    Attributes:
        culprit_ranks: the global ranks this error names as the root cause (empty when it names none);
            ``shoal run`` reads it from a failed rank to name the real culprit in its summary.
    """

    culprit_ranks: tuple[int, ...] = ()


class NotInitializedError(ShoalError):
    """A Shoal function that needs the runtime was called before ``shoal.init()``."""

    def __init__(self, what: str):
        super().__init__(
            f"shoal: {what}() was called before shoal.init(). "
            "HINT: call `hvd.init()` (or `shoal.init()`) once at the top of your script, on every rank.")


class MismatchError(ShoalError):
    """Ranks disagree on a collective: its name, shape, dtype or op differ across ranks.

    Raised on every rank with the same message, listing what each rank submitted. ``culprit_ranks`` holds
    the ranks that deviated where that is clear (a rank that produced no gradient while the others did).
    """

    def __init__(self, message: str, *, culprit_ranks: Iterable[int] = ()):
        super().__init__(message)
        self.culprit_ranks = _ranks(culprit_ranks)


class HorovodInternalError(ShoalError):
    """A collective failed because of another rank: it died, hung, left or lost its connection (Horovod's
    name, which Horovod users catch, e.g. around an elastic training loop). Shoal raises its subclasses
    :class:`RankFailureError` and :class:`StallError`, so ``except hvd.HorovodInternalError`` catches both.
    Under elastic training (``hvd.elastic.run``) it is recoverable: the survivors go on in a new world. (A
    mismatch of arguments is :class:`MismatchError`: a bug to fix, not a failure to recover from.)"""


class HostsUpdatedInterrupt(ShoalError):
    """The elastic job's membership changes at this commit: workers join or leave (Horovod's name).
    Raised on every rank alike by ``state.commit()`` / ``state.check_host_updates()``; ``hvd.elastic.run``
    handles it.

    Attributes:
        skip_sync: True when the state need not be synchronized again (nobody joined, so every rank already
            holds the same state), as in Horovod.
    """

    def __init__(self, skip_sync: bool = False, message: Optional[str] = None):
        self.skip_sync = bool(skip_sync)
        super().__init__(message or "shoal: the elastic job's membership changes at this commit (workers join "
                                    "or leave); hvd.elastic.run restores or syncs the state and goes on. HINT: "
                                    "seen outside hvd.elastic.run, the commit ran in a function that is not "
                                    "decorated with @hvd.elastic.run; decorate the training function")


class RankFailureError(HorovodInternalError):
    """A collective failed because a peer rank died, timed out, left or lost its connection.

    Build it from fields (the message is rendered from them, once) or, for a failure that names no peer,
    from a message.

    Attributes:
        rank: the rank that raised it.
        what: the collective that failed, as messages name it.
        dead_ranks: peers found gone (their process died or exited), the root cause when not empty;
            ``dead_pids`` their pids.
        missing_ranks: peers that never arrived in the collective (a timeout), with what each was doing
            instead in ``doing`` where it is known; ``missing_text`` says it in words.
        timed_out: the backend's timeout fired (after ``timeout_s``).
        backend_text: what the backend said (its first line).
        unknown_ranks: peers on other hosts, which cannot be checked for liveness from here.
        hint: what to do, rendered after the message.
    """

    def __init__(self, message: Optional[str] = None, *, rank: int = -1, what: str = "",
                 dead_ranks: Iterable[int] = (), dead_pids: Optional[Mapping[int, int]] = None,
                 missing_ranks: Iterable[int] = (), doing: Optional[Mapping[int, str]] = None,
                 missing_text: str = "", timed_out: bool = False, timeout_s: float = 0.0,
                 backend_text: str = "", unknown_ranks: Iterable[int] = (), hint: str = ""):
        self.rank = int(rank)
        self.what = what
        self.dead_ranks = _ranks(dead_ranks)
        self.dead_pids = dict(dead_pids or {})
        self.missing_ranks = _ranks(missing_ranks)
        self.doing = dict(doing or {})
        self.missing_text = missing_text
        self.timed_out = bool(timed_out)
        self.timeout_s = float(timeout_s)
        self.backend_text = backend_text
        self.unknown_ranks = _ranks(unknown_ranks)
        self.hint = hint
        self.culprit_ranks = self.dead_ranks or self.missing_ranks
        self._message = message
        super().__init__(message if message is not None else self._render())

    def _render(self) -> str:
        said = f" (backend said: {self.backend_text})" if self.backend_text else ""
        if self.dead_ranks:
            who = ", ".join(f"rank {r}" + (f" (pid {self.dead_pids[r]})" if r in self.dead_pids else "")
                            for r in self.dead_ranks)
            text = (f"shoal: {self.what} failed on rank {self.rank} because {who} died or exited. Root cause "
                    f"is on that rank: see its log.{said}")
        elif self.timed_out:
            who = self.missing_text or "some rank never joined it (a rank that skipped the call, or diverged)"
            text = (f"shoal: {self.what} timed out on rank {self.rank} after {self.timeout_s:g} s: {who}.{said}"
                    " HINT: make every rank call the same collectives in the same order; raise timeout_s "
                    "(SHOAL_TIMEOUT_S) if a rank is merely slow.")
        else:
            text = f"shoal: {self.what} failed on rank {self.rank}: {self.backend_text or 'unknown error'}"
            if self.unknown_ranks:
                text += f" (ranks {list(self.unknown_ranks)} on other hosts could not be checked for liveness)"
        return text + (f"\nHINT: {self.hint}" if self.hint else "")

    def replace(self, **changes) -> "RankFailureError":
        """A copy with ``changes`` to its fields, the message rendered again (a message-built error keeps
        its message)."""
        fields = {k: getattr(self, k) for k in ("rank", "what", "dead_ranks", "dead_pids", "missing_ranks",
                                                "doing", "missing_text", "timed_out", "timeout_s",
                                                "backend_text", "unknown_ranks", "hint")}
        fields.update(changes)
        err = RankFailureError(self._message, **fields)
        err.__cause__ = self.__cause__
        return err


class StallError(HorovodInternalError):
    """A rank waited on a collective longer than allowed; names the ranks that did not arrive.

    Attributes:
        rank: the rank that raised it.
        where: what this rank was in (e.g. "step 3 of DistributedOptimizer").
        waited_for: what it waited for (a bucket, the negotiation vector, a collective).
        waited_s: how long it waited.
        missing_ranks: the ranks that never arrived (the root cause), with what each was doing instead in
            ``doing`` where it is known; ``missing_text`` says it in words.
    """

    _HINT = ("a rank that ends its loop early (fewer batches) must call join() after the loop, on every "
             "rank; a rank blocked elsewhere (a collective only it called, data loading, a deadlock) shows "
             "it in its Python stack (py-spy dump --pid <pid>); raise SHOAL_STALL_TIMEOUT_S if a rank is "
             "merely slow.")

    def __init__(self, message: Optional[str] = None, *, rank: int = -1, where: str = "",
                 waited_for: str = "", waited_s: float = 0.0, missing_ranks: Iterable[int] = (),
                 doing: Optional[Mapping[int, str]] = None, missing_text: str = ""):
        self.rank = int(rank)
        self.where = where
        self.waited_for = waited_for
        self.waited_s = float(waited_s)
        self.missing_ranks = _ranks(missing_ranks)
        self.doing = dict(doing or {})
        self.missing_text = missing_text
        self.culprit_ranks = self.missing_ranks
        super().__init__(message if message is not None else
                         f"shoal: rank {self.rank} has waited {self.waited_s:.0f} s in {self.where} for "
                         f"{self.waited_for}: {self.missing_text}. HINT: {self._HINT}")


def format_ranks(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"`` (keeps messages short on large worlds)."""
    ranks = sorted(ranks)
    spans: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        spans.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def shown(names: Sequence[str], limit: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``: tensor names for messages."""
    quoted = [f"'{n}'" for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(quoted) + more
