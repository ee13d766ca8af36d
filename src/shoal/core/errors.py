"""Shoal's exceptions. Every message names what failed (tensor, rank) and ends with a HINT for the fix.

The errors about other ranks carry what they say as fields, so that nothing has to parse their text: the
frontends, the stall inspector and the launcher's summary read ``culprit_ranks`` (the ranks named as the
root cause), ``dead_ranks``, ``missing_ranks`` and ``timed_out``. The text is rendered once, from those
fields, where the error is made.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

__all__ = [
    "ShoalError",
    "NotInitializedError",
    "MismatchError",
    "RankFailureError",
    "StallError",
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


class RankFailureError(ShoalError):
    """A collective failed because a peer rank died, timed out, left or lost its connection.

    Attributes:
        rank: the rank that raised it.
        what: the collective that failed, as messages name it.
        dead_ranks: peers found dead (their process is gone), the root cause when not empty.
        exited_ranks: of those, the ones known to have ended normally (exit code 0: they left the job while
            this rank still waited for them, e.g. after skipping a collective).
        missing_ranks: peers that never arrived in the collective (a timeout), with what each was doing
            instead in ``doing`` where it is known.
        timed_out: the backend's timeout fired.
    """

    def __init__(self, message: str, *, rank: int = -1, what: str = "", dead_ranks: Iterable[int] = (),
                 exited_ranks: Iterable[int] = (), missing_ranks: Iterable[int] = (),
                 doing: Optional[Mapping[int, str]] = None, timed_out: bool = False):
        super().__init__(message)
        self.rank = int(rank)
        self.what = what
        self.dead_ranks = _ranks(dead_ranks)
        self.exited_ranks = _ranks(exited_ranks)
        self.missing_ranks = _ranks(missing_ranks)
        self.doing = dict(doing or {})
        self.timed_out = bool(timed_out)
        self.culprit_ranks = self.dead_ranks or self.missing_ranks


class StallError(ShoalError):
    """A rank waited on a collective longer than allowed; names the ranks that did not arrive.

    Attributes:
        rank: the rank that raised it.
        missing_ranks: the ranks that never arrived (the root cause), with ``doing`` as in
            :class:`RankFailureError`.
        waited_s: how long this rank waited.
        waited_for: what it waited for (a bucket, the negotiation vector, a collective).
    """

    def __init__(self, message: str, *, rank: int = -1, missing_ranks: Iterable[int] = (),
                 doing: Optional[Mapping[int, str]] = None, waited_s: float = 0.0, waited_for: str = ""):
        super().__init__(message)
        self.rank = int(rank)
        self.missing_ranks = _ranks(missing_ranks)
        self.doing = dict(doing or {})
        self.waited_s = float(waited_s)
        self.waited_for = waited_for
        self.culprit_ranks = self.missing_ranks
