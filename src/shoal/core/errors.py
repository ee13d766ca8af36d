"""Shoal's exceptions. Every message names what failed (tensor, rank) and ends with a HINT for the fix."""

from __future__ import annotations

__all__ = [
    "ShoalError",
    "NotInitializedError",
    "MismatchError",
    "RankFailureError",
    "StallError",
]


class ShoalError(RuntimeError):
    """Base class of every error Shoal raises on purpose."""


class NotInitializedError(ShoalError):
    """A Shoal function that needs the runtime was called before ``shoal.init()``."""

    def __init__(self, what: str):
        super().__init__(
            f"shoal: {what}() was called before shoal.init(). "
            "HINT: call `hvd.init()` (or `shoal.init()`) once at the top of your script, on every rank.")


class MismatchError(ShoalError):
    """Ranks disagree on a collective: its name, shape, dtype or op differ across ranks.

    Raised on every rank with the same message, listing what each rank submitted.
    """


class RankFailureError(ShoalError):
    """A collective failed because a peer rank died, timed out or lost its connection."""


class StallError(ShoalError):
    """A rank waited on a collective longer than allowed; names the ranks that did not arrive."""
