"""The stall inspector: a rank that waits too long says so, then fails naming the ranks that never arrived,
what each of them is doing instead, or that it died.

This module owns the waits of the gradient engine (:class:`StallInspector`) and the records that ranks
leave in the rendezvous store while they wait (a side channel that still answers while a collective
hangs); the user collectives read and write the same records when they time out
(:func:`name_missing_members`).

Design constraints:

1. No busy loop and no thread of ours. Waiting is ``threading.Event.wait(timeout)`` on an event set by the
   futures' completion callbacks.
2. A healthy step costs no store round trip: the store is touched only after a rank has waited
   ``_ARRIVE_AFTER_S`` (a store write per step and rank would be the coordinator traffic the negotiation
   avoids). A rank that waits that long writes ONE record (which wait, its position in it, what it is), at
   most once per step (a second long wait of the same step finds it written), and never clears it:
   readers tell a stale record from the position it carries. User collectives keep their plain blocking
   waits and write only when they fail.
3. The failure path is bounded and light on the store (it is the job's one TCPStore, and every failing
   rank reads it): a warning reports the records as they are, with no wait; a failure waits at most
   ``_SETTLE_S`` (a step) or :func:`_settle_s` (a user collective) for the records of missing ranks,
   polling only those, 0.1 s doubling to 2 s, one ``multi_get`` per poll.
4. What the inspector finds travels as fields of the error (``missing_ranks``, ``doing``), so that the
   launcher and the frontends read them instead of parsing text (:mod:`shoal.core.errors`).

Positions: a step's records carry the step's number (1-based, the step owner's); a user collective's its
call number on the process set.

What lives elsewhere: liveness of local peers through their pids and the backend's wording
(:func:`shoal.core.runtime.explain_failure`), the per-step agreement (:mod:`shoal.core.negotiation`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import runtime
from .errors import RankFailureError, ShoalError, StallError, format_ranks, shown

__all__ = ["StallInspector", "name_missing_members", "stall_timeouts"]

log = logging.getLogger(__name__)

#: After this long waiting, a rank writes "arrived at step k" to the store (constraint 2).
_ARRIVE_AFTER_S = 1.0
#: On the failure path, how long at least to wait for a missing peer's record: a rank in a step
#: writes it after waiting ``_ARRIVE_AFTER_S`` itself, so one that entered its step just now has not yet.
_SETTLE_S = _ARRIVE_AFTER_S + 0.5
#: Polling of missing ranks' records on the failure path: first sleep, doubled up to the last (constraint 3).
#: At the longest settle (60 s) that is 34 polls instead of 600 at a fixed 0.1 s.
_POLL_FIRST_S = 0.1
_POLL_MAX_S = 2.0


def _doing_key(rank: int) -> str:
    """Store key of ``rank``'s record: which wait it is in and where (see :class:`StallInspector`)."""
    return f"shoal/doing/{rank}"


def _record(tag: str, position: int, where: str) -> str:
    return f"{tag}\t{position}\t{where}"


def _parse_record(raw: bytes) -> Optional[tuple[str, int, str]]:
    """``(tag, position, where)`` of a record; None for no record (``b""``: created empty by a reader)."""
    try:
        tag, position, where = raw.decode().split("\t", 2)
        return tag, int(position), where
    except (UnicodeDecodeError, ValueError):
        return None


def _store() -> Optional[dist.Store]:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


#: The record this process wrote last, with the default group it was written under (constraint 2: a
#: second long wait in the same step does not write it again).
_written: tuple[Any, str] = (None, "")


def _read_records(store, ranks: Sequence[int], *, present: bool = False) -> tuple[dict[int, bytes], bool]:
    """Each rank's record (``b""``: none), in as few store requests as the store allows; and whether every
    key now exists (pass it back as ``present`` when polling the same ranks again).

    With every key present: one ``multi_get`` (TCPStore answers it in one round trip). Otherwise each key
    is read with ``compare_set(key, "", "")``, which returns the value and creates an absent key empty
    (never overwriting a record), so that every later poll is one ``multi_get``; a store without those
    falls back to ``check`` and ``get`` per key. Nothing read when the store does not answer.
    """
    if not ranks:
        return {}, present
    keys = [_doing_key(r) for r in ranks]
    try:
        try:
            if present or store.check(keys):
                return dict(zip(ranks, store.multi_get(keys))), True
            return {r: store.compare_set(k, "", "") for r, k in zip(ranks, keys)}, True
        except (NotImplementedError, AttributeError):  # a store of the user's without them
            return {r: store.get(k) if store.check([k]) else b"" for r, k in zip(ranks, keys)}, False
    except RuntimeError:
        return {}, False


#: Live step inspectors by tag, with the world they belong to (weak: an optimizer that is gone drops out).
_live: dict[str, tuple[Any, "weakref.ref[StallInspector]"]] = {}


class StallInspector:
    """Waits on futures without busy-looping; warns after ``stall_warning_s`` and fails after
    ``stall_timeout_s``, naming the ranks that never arrived, what each of them is doing, or that it died.

    A rank that has waited ``_ARRIVE_AFTER_S`` writes one record to the rendezvous store: ``doing/<rank> =
    (tag, position, where)``, one key per rank shared by every inspector (the steps of every optimizer and
    the user collectives of every process set). A waiting peer reads from it both whether the rank reached
    this point (its tag and a position at least this one) and, if not, what it is in instead. The record is
    never cleared (constraint 2): one of this tag at an earlier position says where the rank last arrived;
    one of another optimizer's tag is current while the reader has not finished that step itself, stale
    once it has. A rank with no current record is named as being outside every Shoal collective.

    Args:
        process_set: the ranks that take part in the waited-for collectives.
        tag: names this waiter in records (unique per process set, the same on every rank).
        what: for messages, e.g. ``"DistributedOptimizer"``.
        kind: ``"step"`` (a gradient step: the missing ranks "have not reached synchronize()") or
            ``"collective"`` (a user collective of :mod:`shoal.core.collectives`: records and names only).
        position: for ``kind="step"``, the number of the step this rank is in now (its readers tell a
            current record of this tag from a stale one with it).
    """

    def __init__(self, process_set: runtime.ProcessSet, tag: str, what: str, *, kind: str = "step",
                 position: Optional[Callable[[], int]] = None):
        self.process_set = process_set
        self.tag = tag
        self.what = what
        self.kind = kind
        self.position = position
        if position is not None:
            _live[tag] = (runtime.world_token(), weakref.ref(self))

    @staticmethod
    def first_wait_s() -> float:
        """How long a wait stays silent (no store access) before this rank announces where it waits."""
        return _first_wait_s(stall_timeouts()[0])

    def wait(self, futures: Sequence[Optional[torch.futures.Future]], step: int,
             names_of: Optional[Callable[[int], list[str]]] = None, label: str = "bucket", *,
             where: Union[None, str, Callable[[], str]] = None,
             awaited: Union[None, str, Callable[[], str]] = None) -> None:
        """Return when every future is done or one failed (the caller's ``wait()`` raises its error).

        Args:
            futures: the awaited futures (None entries are skipped).
            step: this rank's position: the step number (``kind="step"``) or the call's number on the
                process set.
            names_of: future index -> tensor names, for messages (``label`` names one future: "bucket").
            where: what this rank is waiting in, for messages and the record (default: "step k of
                <what>"); a callable is called only once the wait has lasted ``first_wait_s``, so that a
                healthy step formats nothing.
            awaited: overrides the "bucket 0 ('a', 'b')" part of messages (a callable: as ``where``).

        Raises:
            StallError: past ``stall_timeout_s``; names the missing ranks, what they are doing and the
                awaited tensors (fields ``missing_ranks``, ``doing``).
            RankFailureError: past ``stall_timeout_s`` with a missing rank found dead.
        """
        pending = [k for k, f in enumerate(futures) if f is not None and not f.done()]
        if not pending:
            return
        event = threading.Event()
        left = [len(pending)]
        lock = threading.Lock()

        def done(fut: torch.futures.Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            failed = False
            if not last:
                try:
                    fut.value()
                except Exception:  # noqa: BLE001 (only noticing it; the caller's wait() raises it)
                    failed = True
            if last or failed:
                event.set()

        for k in pending:
            futures[k].add_done_callback(done)
        warn_s, timeout_s = stall_timeouts()
        start = time.monotonic()
        if event.wait(_first_wait_s(warn_s)):
            return
        where = (where() if callable(where) else where) or f"step {step} of {self.what}"
        if callable(awaited):
            awaited = awaited()
        if awaited is None:
            awaited = self._awaited([k for k in pending if not futures[k].done()], names_of, label)
        store = self._announce(step, where)
        warned = False
        forming = _elastic_watch()
        while True:
            mark = timeout_s if warned else warn_s
            remaining = max(0.0, mark - (time.monotonic() - start))
            if event.wait(min(remaining, _ELASTIC_POLL_S) if forming is not None else remaining):
                return
            if forming is not None and forming():
                runtime.abandon_futures(futures)  # pending on the world this rank now leaves
                raise RankFailureError(
                    rank=runtime.rank(), what=where, backend_text="peers started the next generation of the "
                    "elastic job (another rank failed or left)", dead_ranks=())
            if time.monotonic() - start < mark:
                continue
            failing = warned or warn_s >= timeout_s
            text, missing, doing = self.who(store, step, settle=failing)
            err = StallError(rank=runtime.rank(), where=where, waited_for=awaited,
                             waited_s=time.monotonic() - start, missing_ranks=missing, doing=doing,
                             missing_text=text)
            if not failing:
                log.warning("%s", err)
                warned = True
                continue
            # The record stays: peers failing a moment later still see where this rank is stuck.
            runtime.abandon_futures(futures)
            raise self._dead_or(err, missing, where)

    @staticmethod
    def _awaited(waiting: list[int], names_of: Optional[Callable[[int], list[str]]], label: str) -> str:
        if not waiting or names_of is None:
            return label
        names = [n for k in waiting for n in names_of(k)]
        plural = "s" if len(waiting) > 1 else ""
        first = ", ".join(str(k) for k in waiting[:4]) + (", ..." if len(waiting) > 4 else "")
        return f"{label}{plural} {first} ({shown(names)})"

    def _announce(self, position: int, where: str) -> Optional[dist.Store]:
        """Write this rank's record (slow path only: after ``first_wait_s``), unless it is the one this
        process wrote last (a second long wait in the same step). Returns the store, None if unreachable."""
        global _written
        store = _store()
        if store is None:
            return None
        record = _record(self.tag, position, where)
        token = runtime.world_token()
        if _written[0] is token and _written[1] == record:
            return store
        try:
            store.set(_doing_key(runtime.rank()), record)
        except RuntimeError:
            return None
        _written = (token, record)
        return store

    def who(self, store, step: int, *, settle: bool = True) -> tuple[str, list[int], dict[int, str]]:
        """Who has not arrived at position ``step`` and what each of them is doing: the phrase for
        messages, those ranks, and what each of those with a current record is in.

        Reads the store only (the failure path, constraint 3). With ``settle`` (a failure), a missing rank
        with no current record yet gets a bounded wait: a rank in a step writes it after its own first
        second (``_SETTLE_S``), a rank in a user collective when that collective times out, which a failing
        user collective waits for too (:func:`_settle_s`); a failing step does not (it fails before the
        backend's timeout on purpose). Only those ranks are polled again, 0.1 s doubling to 2 s. Without
        ``settle`` (a warning), one read.
        """
        if store is None:
            return "the rendezvous store is not reachable, so the missing ranks cannot be named", [], {}
        me = runtime.rank()
        window = (_SETTLE_S if self.kind == "step" else _settle_s()) if settle else 0.0
        deadline = time.monotonic() + window
        records, present = _read_records(store, [r for r in self.process_set.ranks if r != me])
        delay = _POLL_FIRST_S
        while True:
            missing, doing, seen = self._classify(records, step)
            unexplained = [r for r in missing if r not in doing]
            left = deadline - time.monotonic()
            if not unexplained or left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(2 * delay, _POLL_MAX_S)
            fresh, present = _read_records(store, unexplained, present=present)
            records.update(fresh)
        if not missing:
            where = "this step" if self.kind == "step" else "this collective"
            return (f"every rank reached {where}: the collective itself is stuck or slow "
                    "(network, an overloaded host)"), [], {}
        outside = ("never reached a collective (busy or hung outside Shoal)" if self.kind == "collective" else
                   "never reached a collective (busy or hung outside Shoal, or in a user collective, which "
                   "says so only when it times out)")
        status = "; ".join(f"rank {r} is in {doing[r]}" if r in doing else f"rank {r} {outside}"
                           for r in missing)
        if self.kind == "collective":
            return status, missing, doing
        last = [f"rank {r} last arrived in step {seen[r]}" for r in missing if r in seen]
        lead = (f"{format_ranks(missing)} {'has' if len(missing) == 1 else 'have'} not reached "
                f"synchronize() of this step" + (f" ({'; '.join(last)})" if last else ""))
        return f"{lead}: {status}", missing, doing

    def _classify(self, records: dict[int, bytes], step: int) -> tuple[list[int], dict[int, str], dict[int, int]]:
        """From the members' records: the ranks that have not arrived at ``step`` (every member but this
        one without a record of this tag at ``step`` or later), what those with a current record of
        another wait are in, and where those with an earlier record of this tag last arrived."""
        me = runtime.rank()
        missing: list[int] = []
        doing: dict[int, str] = {}
        seen: dict[int, int] = {}
        for r in self.process_set.ranks:
            if r == me:
                continue
            rec = _parse_record(records.get(r, b""))
            if rec is not None and rec[0] == self.tag:
                if rec[1] >= step:
                    continue  # arrived
                seen[r] = rec[1]  # an earlier wait of this one: stale
            elif rec is not None:
                current = _record_is_current(rec[0], rec[1])
                if current is not False:
                    doing[r] = rec[2] if current else f"{rec[2]} (as of its last record)"
            missing.append(r)
        return missing, doing, seen

    def name_missing(self, err: RankFailureError, step: int) -> RankFailureError:
        """``err`` (a backend timeout, as the runtime explained it) with the missing ranks named and what
        each is doing, read from the store; ``err`` itself when it names a dead rank, is no timeout, or no
        rank is missing."""
        if not err.timed_out or err.dead_ranks:
            return err
        text, missing, doing = self.who(_store(), step)
        if not missing:
            return err
        return err.replace(missing_ranks=missing, doing=doing, missing_text=text)

    def _dead_or(self, err: StallError, missing: Sequence[int], where: str) -> ShoalError:
        """``err``, unless a missing rank is dead: then the runtime's error naming it, quoting ``err``."""
        if not missing:
            return err
        dead = runtime.explain_failure(err, where, list(missing), grace_s=0.0)
        return dead if dead.dead_ranks else err


#: Under elastic training, how often a long wait looks whether the others started the next generation.
_ELASTIC_POLL_S = 0.25


def _elastic_watch() -> Optional[Callable[[], bool]]:
    """Under elastic training: a check whether the job is forming its next generation (a peer met a failure
    this rank's wait cannot see, e.g. a peer that left the old groups); None otherwise."""
    if not runtime.elastic():
        return None
    from . import elastic  # noqa: PLC0415 (elastic imports the engine)

    return elastic.forming


def _first_wait_s(warn_s: float) -> float:
    return min(_ARRIVE_AFTER_S, warn_s / 2)


def _record_is_current(tag: str, position: int) -> Optional[bool]:
    """Whether a record of another wait than the reader's still describes the writer: a user collective's
    (written when it failed) always; an optimizer step's while this rank has not finished that step itself
    (no rank can leave a step before every member entered its collectives); None when this rank has no
    such optimizer (it is not in that process set) and cannot tell."""
    if tag.startswith("coll/"):
        return True
    entry = _live.get(tag)
    if entry is None or entry[0] is not runtime.world_token():
        return None
    inspector = entry[1]()
    if inspector is None or inspector.position is None:
        return None
    return position >= inspector.position()


def stall_timeouts() -> tuple[float, float]:
    """``(stall_warning_s, stall_timeout_s)`` in force."""
    cfg = runtime.config()
    # Default: fail a little before the process-group timeout, so the named error comes first.
    timeout_s = float(cfg.stall_timeout_s or 0.0) or 0.9 * cfg.timeout_s
    return min(cfg.stall_warning_s, timeout_s), timeout_s


def name_missing_members(err: RankFailureError, process_set: runtime.ProcessSet, position: int,
                         where: str) -> RankFailureError:
    """A user collective failed by the backend's timeout (``err``, as the runtime explained it): write where
    this rank is to the store, read the other members' records, and return ``err`` with the members that
    never arrived named and what each of them is in (see :meth:`StallInspector.name_missing`).

    Only this failure path touches the store: the healthy path of a user collective is the plain blocking
    wait (:mod:`shoal.core.collectives`). Members that time out in their own collective a moment later are
    waited for, a bounded time (:func:`_settle_s`).

    Args:
        err: the runtime's explanation of the backend error.
        process_set: the collective's process set.
        position: the call's number on that process set (the same on every member).
        where: the call as messages name it, e.g. ``"allreduce of 'x' (call 3 on process set [0, 1])"``.

    Returns:
        ``err`` itself when it is no timeout, names a dead rank, or no member is missing.
    """
    if not err.timed_out or err.dead_ranks:
        return err
    inspector = StallInspector(process_set, f"coll/ps{process_set.process_set_id}", "collective",
                               kind="collective")
    inspector._announce(position, where)
    return inspector.name_missing(err, position)


def _settle_s() -> float:
    """How long a failing user collective waits for missing members' records: at least ``_SETTLE_S``; a
    member in another user collective writes only when its own backend timeout fires, which comes later
    by the time it entered later: 10% of ``timeout_s`` plus 2 s covers that skew, capped at a minute
    (32 s at the default 300 s). The polls' last sleep ends at this bound, so a failing user collective
    raises at most this long after its backend timeout, plus the store's round trips; sooner once every
    missing member has a record. Its peers are polled 0.1 s doubling to 2 s (constraint 3): at 32 s, 21
    reads (the first pass and 20 polls of the still-missing members), where a fixed 0.1 s made 320 of
    every member."""
    return min(60.0, max(_SETTLE_S, 0.1 * runtime.config().timeout_s + 2.0))
