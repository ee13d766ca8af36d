"""Decentralized negotiation: ranks agree on what they reduce, without a coordinator, and fail loudly
(naming the rank and the tensor) instead of hanging.

This module owns, for the gradient engine:

* the **registration check**: when a ``DistributedOptimizer`` (or the DDP hook) is created, ranks compare a
  64-bit digest of their ``(name, shape, dtype)`` lists; on a mismatch every rank raises the same
  :class:`~shoal.core.errors.MismatchError` listing the differing tensors and which ranks hold what;
* the **per-step bit vector** (:class:`Negotiator`): which gradients each rank produced, combined by ONE
  small bitwise-AND allreduce, so that every rank knows which tensors all / some / none of the ranks have;
* **static-model detection**: after a few identical steps, the per-step collective is replaced by one flag
  element riding in the last gradient bucket, plus a full check every 100 steps;
* the **stall inspector** (:class:`StallInspector`): a rank that waits too long logs, then fails, naming
  the ranks that never arrived, what each of them is waiting in instead (seen through the rendezvous
  store, a side channel that works while a collective hangs) and the ranks that died; the user
  collectives use its records when they time out (:func:`name_missing_members`);
* **join** (:func:`join`): a rank out of data shadows the others' steps with zeros until every rank joined.

What lives elsewhere: the buckets and their collectives (:mod:`shoal.core.reducer`), when hooks fire and
what ``param.grad`` becomes (the frontends: ``shoal.torch.optimizer``, ``shoal.torch.join``), the checks of
user collectives (:mod:`shoal.core.collectives` exchanges a signature before each call and names missing
members through :func:`name_missing_members`), pid liveness (:func:`shoal.core.runtime.explain_failure`).

Design constraints:

1. No coordinator. Every rank contributes the same fixed-size vector ``v`` and the ranks combine
   ``cat(v, ~v)`` with one ``BAND`` allreduce: the first half says which bits ALL ranks set, the second which
   bits NO rank set. Per tensor that is all / some / none; per control word it is "equal on every rank"
   (``all | none == -1``). Payload: ``2 * (ceil(T / 64) + 3)`` int64 per rank (176 bytes for the 482-tensor
   benchmark model), the same at any world size; Horovod's uncached coordinator makes rank 0 receive N
   request lists of T entries each step (benchmarks/negotiation_bench.py counts both).
2. The data collectives never depend on the negotiation. Every rank launches the same buckets in the same
   order whatever it produced (a gradient it did not produce travels as the zeros of its view), so the
   negotiation only decides semantics (a gradient NO rank produced becomes ``None``, as in single-process
   training; one that SOME ranks produced is their sum divided by the world size, i.e. zeros from the others)
   and errors. Its allreduce runs on its own gloo group (bitwise ops exist on gloo, not on NCCL; the bits
   are host state anyway), started before the last buckets and waited for with them.
3. Every decision is taken from reduced data, so it is the same on every rank: all ranks switch modes in
   the same step, and all take the slow path (one ``all_gather_object`` of details, to name ranks and
   tensors) together. Nothing can leave a rank waiting in a collective its peers skipped.
4. Static models do not pay a collective per step. After ``_STATIC_AFTER_STEPS`` steps in which no rank's
   set changed, a rank only compares its set with its own previous one; a rank that deviates writes 1 into
   a control slot appended to the last bucket (16 elements, one alignment unit), which every rank reads
   after the reduction: a non-zero sum sends every rank through the full negotiation in that same step.
   The last bucket is the one place a deviation can still ride: it goes on the wire only once every
   earlier gradient is ready, or in ``synchronize()`` when some never came. Every ``_CHECK_EVERY_STEPS``
   steps the full negotiation runs anyway (it also compares step counters and registration digests).
5. Gradients that fire several times in one backward pass (reentrant activation checkpointing runs a
   backward per segment) are marked ready on their last firing. How many firings that is, each rank learns
   locally: step 1 launches nothing early, so what it counts is safe; a firing beyond the learned count
   after the bucket went on the wire cannot be repaired (autograd adds into the buffer in flight) and is
   reported on every rank.
6. No busy loop and no thread of ours. Waiting is ``threading.Event.wait(timeout)`` on an event set by the
   futures' completion callbacks; the store is touched only after a rank has waited ``_ARRIVE_AFTER_S``,
   so a healthy step costs no store round trip (a store write per step and rank would be the coordinator
   traffic constraint 1 avoids). A rank that waits that long writes ONE record (which wait, its position
   in it, what it is), at most once per step (a second long wait of the same step finds it written), and
   never clears it: readers tell a stale record from the position it carries. It is read by the peers only
   on their failure path, with one ``multi_get`` per poll and a backing-off poll of the ranks still
   unexplained (constraint 8). User collectives keep their plain blocking waits and write only when they
   fail.
7. Ranks agree on the settings that decide which collectives a step runs: ``negotiation``, ``nan_check``,
   ``check_every_steps`` here, and what the frontend resolves and passes as ``settings=`` (bucket layout,
   streams, compression, hierarchy, backward passes per step, what the autotuner tunes). They are part of
   the registration digest (a one-time cost), so ranks configured differently fail at registration,
   naming the setting and each rank's value, instead of hanging in a collective only some of them start.
8. The failure path is bounded and light on the store (it is rank 0's TCPStore, and every failing rank
   reads it): a warning reports the records as they are, with no wait; a failure waits at most
   ``_SETTLE_S`` (a step) or :func:`_settle_s` (a user collective) for the records of missing ranks,
   polling only those, 0.1 s doubling to 2 s.

Glossary:
    produced   a gradient whose accumulation hook fired on this rank in this step
    none-have  produced by no rank: its gradient becomes ``None`` after the step's synchronization
    static     the mode in which no per-step collective runs (constraint 4)
    joined     a rank inside :func:`join`: it contributes zeros to the others' steps
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import runtime
from . import timeline as _timeline
from .buckets import ALIGN_NUMEL
from .config import ShoalConfig, env_name
from .errors import MismatchError, RankFailureError, ShoalError, StallError

__all__ = [
    "NEGOTIATION_MODES",
    "Negotiator",
    "StallInspector",
    "check_registration",
    "registration_digest",
    "control_nbytes",
    "join",
    "name_missing_members",
]

log = logging.getLogger(__name__)

#: Values of the ``negotiation`` knob: ``auto`` (negotiate until the model looks static, then check
#: cheaply), ``always`` (one bit-vector allreduce every step), ``off`` (no per-step negotiation: a gradient
#: no rank produced is reduced as zeros; registration check and stall inspector stay on).
NEGOTIATION_MODES = ("auto", "always", "off")

#: Steps in a row without any rank's set changing before ``auto`` stops negotiating every step.
_STATIC_AFTER_STEPS = 5
#: In static mode, run the full negotiation every this many steps anyway (constraint 4).
_CHECK_EVERY_STEPS = 100
#: After this long waiting, a rank writes "arrived at step k" to the store (constraint 6).
_ARRIVE_AFTER_S = 1.0
#: On the failure path, how long at least to wait for a missing peer's record: a rank in a step
#: writes it after waiting ``_ARRIVE_AFTER_S`` itself, so one that entered its step just now has not yet.
_SETTLE_S = _ARRIVE_AFTER_S + 0.5
#: Polling of missing ranks' records on the failure path: first sleep, doubled up to the last (constraint 8).
#: At the longest settle (60 s) that is 34 polls instead of 600 at a fixed 0.1 s.
_POLL_FIRST_S = 0.1
_POLL_MAX_S = 2.0
#: A peer that closed its connection is usually exiting: how long to wait for it to be seen dead.
_EXIT_GRACE_S = 2.0
#: Elements appended to the last bucket for the static-mode flag (one alignment unit, see buckets.py).
_SLOT_NUMEL = ALIGN_NUMEL

# Flag bits of the control word.
_CHANGED = 1   # this rank's produced set differs from its previous step's
_EMPTY = 2     # this rank produced nothing (and is not joined)
_JOINED = 4    # this rank is inside join(): it shadows the step with zeros
_ERROR = 8     # this rank has an error to report on every rank (details on the slow path)

_MASK64 = (1 << 64) - 1
#: Names of the runtime config's knobs (settings with an environment variable, for hints).
_KNOBS = frozenset(f.name for f in dataclasses.fields(ShoalConfig))


def _hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` of a str is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _signed(word: int) -> int:
    word &= _MASK64
    return word - (1 << 64) if word >= 1 << 63 else word


def _words(bits: int, count: int) -> list[int]:
    return [_signed(bits >> (64 * k)) for k in range(count)]


def _unwords(words: Sequence[int]) -> int:
    bits = 0
    for k, w in enumerate(words):
        bits |= (w & _MASK64) << (64 * k)
    return bits


def _pack(counts: Sequence[int]) -> int:
    """Bit i set when ``counts[i]`` is non-zero (~25 us for 480 tensors)."""
    if not counts:
        return 0
    return int("".join("1" if c else "0" for c in reversed(counts)), 2)


def _indices(bits: int) -> list[int]:
    out, i = [], 0
    while bits:
        if bits & 1:
            out.append(i)
        bits >>= 1
        i += 1
    return out


def _format_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"``."""
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


def _shown(names: Sequence[str], limit: int = 3) -> str:
    quoted = [f"'{n}'" for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(quoted) + more


def control_nbytes(num_tensors: int) -> int:
    """Bytes one rank contributes to the per-step negotiation allreduce for ``num_tensors`` tensors."""
    return 2 * ((num_tensors + 63) // 64 + 3) * 8


# ---------------------------------------------------------------------------------------------------------
# Control groups: one gloo group per process set, for the bit vectors (constraint 2)
# ---------------------------------------------------------------------------------------------------------

_control: dict[tuple[int, ...], tuple[Any, dist.ProcessGroup]] = {}


def _world_token() -> Any:
    """The current default group: cached groups and negotiators are valid only while it is the same."""
    return dist.distributed_c10d._get_default_group()


def _control_group(ps: runtime.ProcessSet) -> dist.ProcessGroup:
    """The gloo group of ``ps``'s ranks that carries negotiation traffic (created once, by members only)."""
    token = _world_token()
    have = _control.get(ps.ranks)
    if have is not None and have[0] is token:
        return have[1]
    timeout = datetime.timedelta(seconds=runtime.config().timeout_s)
    # Members only (use_local_synchronization): a process set's non-members never build an optimizer on it.
    group = dist.new_group(list(ps.ranks), timeout=timeout, backend="gloo", use_local_synchronization=True)
    _control[ps.ranks] = (token, group)
    return group


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


#: The record this process wrote last, with the default group it was written under (constraint 6: a
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


# ---------------------------------------------------------------------------------------------------------
# Registration check
# ---------------------------------------------------------------------------------------------------------

Entry = tuple[str, tuple[int, ...], Any]


def registration_digest(entries: Sequence[Entry], settings: Optional[dict[str, str]] = None) -> int:
    """64-bit digest of ``[(name, shape, dtype), ...]`` in order, and of ``settings`` when given (the same
    in every process)."""
    listed = repr([(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in entries])
    if settings:
        listed += repr(sorted((str(k), str(v)) for k, v in settings.items()))
    return _hash64(listed)


def check_registration(entries: Sequence[Entry], process_set: Optional[runtime.ProcessSet] = None,
                       what: str = "DistributedOptimizer", settings: Optional[dict[str, str]] = None) -> int:
    """Check that every member of ``process_set`` registered the same ``(name, shape, dtype)`` list, with
    the same ``settings`` (constraint 7).

    One 16-byte ``BAND`` allreduce of ``[digest, ~digest]``; only on a mismatch, one ``all_gather_object``
    of the lists to say what differs. Call it on every member, at the same point.

    Args:
        entries: ``(name, shape, dtype)`` of every tensor, in order.
        process_set: the ranks that must agree (default: all).
        what: names the owner in messages.
        settings: knobs that decide which collectives run (e.g. ``{"negotiation": "auto", "nan_check":
            "raise"}``): ranks that differ would hang in a collective only some of them start.

    Returns:
        The digest.
    Raises:
        MismatchError: on every member, the same message: each differing setting and tensor with what each
            rank holds (or "missing"), or the first position where the order differs.

    Example:
        >>> check_registration([(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()],
        ...                    settings={"nan_check": "raise"})
    """
    ps = runtime.get_process_set(process_set)
    entries = [(str(n), tuple(int(d) for d in s), str(t).replace("torch.", "")) for n, s, t in entries]
    settings = {str(k): str(v) for k, v in (settings or {}).items()}
    digest = registration_digest(entries, settings)
    if ps.size() == 1:
        return digest
    group = _control_group(ps)
    pair = torch.tensor([digest, ~digest], dtype=torch.int64)
    try:
        dist.all_reduce(pair, op=dist.ReduceOp.BAND, group=group)
        if (int(pair[0]) | int(pair[1])) == -1:
            return digest
        lists: list[Any] = [None] * ps.size()
        dist.all_gather_object(lists, (entries, settings), group=group)
    except RuntimeError as exc:
        raise runtime.explain_failure(exc, f"registration check of {what}", ps.ranks) from exc
    raise MismatchError(_registration_message(ps.ranks, lists, what))


def _abridged(value: str, limit: int = 100) -> str:
    """A setting's value for messages: a long one (e.g. ``groups``, every index) cut, with a digest of the
    whole so that two values that differ past the cut still read differently."""
    if len(value) <= limit:
        return value
    return f"{value[:limit - 40]}... ({len(value)} characters, digest {_hash64(value) & 0xFFFFFFFF:08x})"


def _setting_sources(key: str, what: str) -> str:
    """Where a setting of the registration digest comes from, for the hint."""
    if key in _KNOBS:
        return f"{key} ({env_name(key)}, shoal.init({key}=...) or the {what}'s keyword where it has one)"
    return f"{key} (the {what}'s {key}= argument)"


def _registration_message(ranks: Sequence[int], gathered: list, what: str) -> str:
    lists = [entries for entries, _ in gathered]
    settings = [conf for _, conf in gathered]
    setting_lines = []
    differing = []
    for key in dict.fromkeys(k for conf in settings for k in conf):
        per_rank = [conf.get(key, "unset") for conf in settings]
        if len(set(per_rank)) > 1:
            differing.append(key)
            groups: dict[str, list[int]] = {}
            for r, value in zip(ranks, per_rank):
                groups.setdefault(_abridged(value), []).append(r)
            setting_lines.append(f"  {key}: " + "; ".join(f"{_format_ranks(rs)}: {value}"
                                                         for value, rs in groups.items()))
    described: list[dict[str, str]] = [{n: f"{t} {list(s)}" for n, s, t in lst} for lst in lists]
    names = list(dict.fromkeys(n for lst in lists for n, _, _ in lst))
    lines = []
    for name in names:
        per_rank = [d.get(name, "missing") for d in described]
        if len(set(per_rank)) == 1:
            continue
        groups = {}
        for r, text in zip(ranks, per_rank):
            groups.setdefault(text, []).append(r)
        held = "; ".join(f"{_format_ranks(rs)}: {text}" for text, rs in groups.items())
        lines.append(f"  '{name}': {held}")
    head = f"shoal: ranks registered different parameters for {what} (process set {list(ranks)})"
    body: list[str] = []
    if setting_lines:
        shown = f"its tensors: {_shown([n for n, _, _ in lists[0]])}" if lists[0] else "no named tensors"
        body.append(f"shoal: ranks configured {what} differently (process set {list(ranks)}; {shown}); "
                    "ranks that differ here would hang in a collective only some of them start:")
        body += setting_lines
    tensors_differ = bool(lines) or any(lst != lists[0] for lst in lists)
    if lines:
        shown_lines = lines[:8] + ([f"  ... and {len(lines) - 8} more"] if len(lines) > 8 else [])
        body += [f"{head}: {len(lines)} tensor{'s' if len(lines) > 1 else ''} differ:"] + shown_lines
    elif tensors_differ:  # the same tensors in another order: the bucket plans would pair others
        i = next(i for i in range(max(len(lst) for lst in lists))
                 if len({lst[i][0] if i < len(lst) else None for lst in lists}) > 1)
        at = "; ".join(f"rank {r}: '{lst[i][0]}'" if i < len(lst) else f"rank {r}: none"
                       for r, lst in zip(ranks, lists))
        body.append(f"{head}: the same tensors in a different order; first difference at position {i}: {at}")
    hints = []
    if setting_lines:
        hints.append("set these the same on every rank, they decide which collectives a step runs: " +
                     "; ".join(_setting_sources(key, what) for key in differing) + ".")
    if tensors_differ:
        hints.append("build the same model on every rank and pass the same named_parameters in the same "
                     "order; a part that only some ranks train must exist (and be registered) on every "
                     "rank, it may simply go unused (its gradient then averages with zeros).")
    body.append("HINT: " + " ".join(hints))
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------------------
# Stall inspector
# ---------------------------------------------------------------------------------------------------------

def _names_dead_rank(err: BaseException) -> bool:
    # runtime.explain_failure's wording for a peer found dead through its pid.
    return " died" in str(err)


def _peer_closed(exc: BaseException) -> bool:
    """A backend error that says a peer's connection went away (gloo: 'Connection closed by peer',
    'Connection reset by peer', 'Broken pipe')."""
    text = str(exc).lower()
    return any(w in text for w in ("closed", "reset", "broken pipe", "connection", "eof"))


class StallInspector:
    """Waits on futures without busy-looping; warns after ``stall_warning_s`` and fails after
    ``stall_timeout_s``, naming the ranks that never arrived, what each of them is doing, or that it died.

    A rank that has waited ``_ARRIVE_AFTER_S`` writes one record to the rendezvous store (the c10d store of
    the default group: a side channel that still answers while a collective hangs): ``doing/<rank> =
    (tag, position, where)``, one key per rank shared by every inspector (the steps of every optimizer and
    the user collectives of every process set). A waiting peer reads from it both whether the rank reached
    this point (its tag and a position at least this one) and, if not, what it is in instead. The record is
    never cleared (constraint 6): one of this tag at an earlier position says where the rank last arrived;
    one of another optimizer's tag is current while the reader has not finished that step itself, stale
    once it has. A rank with no current record is named as being outside every Shoal collective. User
    collectives write the same record when they time out (:func:`name_missing_members`), and read the
    others through :meth:`name_missing`.

    Args:
        process_set: the ranks that take part in the waited-for collectives.
        tag: names this waiter in records (unique per process set, the same on every rank).
        what: for messages, e.g. ``"DistributedOptimizer"``.
        kind: ``"step"`` (a gradient step: the missing ranks "have not reached synchronize()") or
            ``"collective"`` (a user collective of :mod:`shoal.core.collectives`: records and names only).
    """

    def __init__(self, process_set: runtime.ProcessSet, tag: str, what: str, *, kind: str = "step"):
        self.process_set = process_set
        self.tag = tag
        self.what = what
        self.kind = kind

    @staticmethod
    def _timeouts() -> tuple[float, float]:
        return _stall_timeouts()

    @staticmethod
    def first_wait_s() -> float:
        """How long a wait stays silent (no store access) before this rank announces where it waits."""
        return _first_wait_s(_stall_timeouts()[0])

    def wait(self, futures: Sequence[Optional[torch.futures.Future]], step: int,
             names_of: Optional[Callable[[int], list[str]]] = None, label: str = "bucket", *,
             where: Union[None, str, Callable[[], str]] = None,
             awaited: Union[None, str, Callable[[], str]] = None) -> None:
        """Return when every future is done or one failed (the caller's ``wait()`` raises its error).

        Args:
            futures: the awaited futures (None entries are skipped).
            step: this rank's position: the step (``kind="step"``) or the call's number on the process set.
            names_of: future index -> tensor names, for messages (``label`` names one future: "bucket").
            where: what this rank is waiting in, for messages and the record (default: "step k of
                <what>"); a callable is called only once the wait has lasted ``first_wait_s``, so that a
                healthy step formats nothing.
            awaited: overrides the "for bucket 0 ('a', 'b')" part of messages (a callable: as ``where``).

        Raises:
            StallError: past ``stall_timeout_s``; names the missing ranks, what they are doing and the
                awaited tensors.
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
        warn_s, timeout_s = self._timeouts()
        start = time.monotonic()
        if event.wait(_first_wait_s(warn_s)):
            self._await_exit([futures[k] for k in pending])
            return
        where = (where() if callable(where) else where) or f"step {step} of {self.what}"
        if callable(awaited):
            awaited = awaited()
        store = self._announce(step, where)
        warned = False
        while True:
            mark = timeout_s if warned else warn_s
            if event.wait(max(0.0, mark - (time.monotonic() - start))):
                self._await_exit([futures[k] for k in pending])
                return
            failing = warned or warn_s >= timeout_s
            waiting = [k for k in pending if not futures[k].done()]
            text, missing = self._describe(store, step, time.monotonic() - start, waiting, names_of, label,
                                           where, awaited, settle=failing)
            if not failing:
                log.warning("%s", text)
                warned = True
                continue
            # The record stays: peers failing a moment later still see where this rank is stuck.
            raise self.failure(StallError(text), missing, where)

    def _announce(self, position: int, where: str) -> Optional[dist.Store]:
        """Write this rank's record (slow path only: after ``first_wait_s``), unless it is the one this
        process wrote last (a second long wait in the same step). Returns the store, None if unreachable."""
        global _written
        store = _store()
        if store is None:
            return None
        record = _record(self.tag, position, where)
        token = _world_token()
        if _written[0] is token and _written[1] == record:
            return store
        try:
            store.set(_doing_key(runtime.rank()), record)
        except RuntimeError:
            return None
        _written = (token, record)
        return store

    def _await_exit(self, futures: Sequence[torch.futures.Future]) -> None:
        """A peer that closed its connection is usually exiting (that is what closed it): give it up to
        ``_EXIT_GRACE_S`` to be seen dead, so that the caller's error names it, not 'connection closed'."""
        for fut in futures:
            if not fut.done():
                continue
            try:
                fut.value()
                continue
            except Exception as exc:  # noqa: BLE001 (only inspected here; the caller's wait() raises it)
                error = exc
            if not _peer_closed(error):
                return
            deadline = time.monotonic() + _EXIT_GRACE_S
            while time.monotonic() < deadline:
                if _names_dead_rank(runtime.explain_failure(error, self.what, self.process_set.ranks)):
                    return
                time.sleep(0.05)
            return

    def _describe(self, store, step: int, waited_s: float, waiting: list[int],
                  names_of: Optional[Callable[[int], list[str]]], label: str, where: str,
                  awaited: Optional[str], *, settle: bool) -> tuple[str, list[int]]:
        me = runtime.rank()
        if awaited is None:
            if waiting and names_of is not None:
                names = [n for k in waiting for n in names_of(k)]
                plural = "s" if len(waiting) > 1 else ""
                first = ", ".join(str(k) for k in waiting[:4]) + (", ..." if len(waiting) > 4 else "")
                awaited = f"{label}{plural} {first} ({_shown(names)})"
            else:
                awaited = label
        who, missing = self.who(store, step, settle=settle)
        text = (f"shoal: rank {me} has waited {waited_s:.0f} s in {where} for {awaited}: {who}. HINT: a rank "
                "that ends its loop early (fewer batches) must call shoal.torch.join() after the loop, on "
                "every rank; a rank blocked elsewhere (a collective only it called, data loading, a "
                "deadlock) shows it in its Python stack (py-spy dump --pid <pid>); raise "
                "SHOAL_STALL_TIMEOUT_S if a rank is merely slow.")
        return text, missing

    def who(self, store, step: int, *, settle: bool = True) -> tuple[str, list[int]]:
        """Who has not arrived at position ``step`` and what each of them is doing; and those ranks.

        Reads the store only (the failure path, constraint 8). With ``settle`` (a failure), a missing rank
        with no current record yet gets a bounded wait: a rank in a step writes it after its own first
        second (``_SETTLE_S``), a rank in a user collective when that collective times out, which a failing
        user collective waits for too (:func:`_settle_s`); a failing step does not (it fails before the
        backend's timeout on purpose). Only those ranks are polled again, 0.1 s doubling to 2 s. Without
        ``settle`` (a warning), one read.
        """
        if store is None:
            return "the rendezvous store is not reachable, so the missing ranks cannot be named", []
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
                    "(network, an overloaded host)"), []
        outside = ("never reached a collective (busy or hung outside Shoal)" if self.kind == "collective" else
                   "never reached a collective (busy or hung outside Shoal, or in a user collective, which "
                   "says so only when it times out)")
        status = "; ".join(f"rank {r} is in {doing[r]}" if r in doing else f"rank {r} {outside}"
                           for r in missing)
        if self.kind == "collective":
            return status, missing
        last = [f"rank {r} last arrived in step {seen[r]}" for r in missing if r in seen]
        lead = (f"{_format_ranks(missing)} {'has' if len(missing) == 1 else 'have'} not reached "
                f"synchronize() of this step" + (f" ({'; '.join(last)})" if last else ""))
        return f"{lead}: {status}", missing

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
        each is doing, read from the store; ``err`` itself when it names a dead rank or no rank is missing."""
        if "timed out" not in str(err) or _names_dead_rank(err):
            return err
        who, missing = self.who(_store(), step)
        if not missing:
            return err
        text = str(err)
        vague = "some rank never joined it (a rank that skipped the call, or diverged)"  # runtime's wording
        return RankFailureError(text.replace(vague, who) if vague in text else f"{text} -- {who}")

    def failure(self, err: ShoalError, missing: Sequence[int], where: Optional[str] = None) -> ShoalError:
        """``err``, unless a missing rank is dead: then the runtime's error naming it, with ``err``'s text."""
        if not missing:
            return err
        dead = runtime.explain_failure(err, where or f"step of {self.what}", list(missing))
        return dead if _names_dead_rank(dead) else err  # its "backend said" quotes err's text


def _first_wait_s(warn_s: float) -> float:
    return min(_ARRIVE_AFTER_S, warn_s / 2)


def _record_is_current(tag: str, position: int) -> Optional[bool]:
    """Whether a record of another wait than the reader's still describes the writer: a user collective's
    (written when it failed) always; an optimizer step's while this rank has not finished that step itself
    (no rank can leave a step before every member entered its collectives); None when this rank has no
    such optimizer (it is not in that process set) and cannot tell."""
    if tag.startswith("coll/"):
        return True
    token = _world_token()
    for entries in _registry.values():
        for tok, ref in entries:
            n = ref()
            if n is not None and tok is token and n.stall.tag == tag:
                return position >= n.step
    return None


def _stall_timeouts() -> tuple[float, float]:
    """``(stall_warning_s, stall_timeout_s)`` in force."""
    cfg = runtime.config()
    # Default: fail a little before the process-group timeout, so the named error comes first.
    timeout_s = float(getattr(cfg, "stall_timeout_s", 0.0) or 0.0) or 0.9 * cfg.timeout_s
    return min(cfg.stall_warning_s, timeout_s), timeout_s


def name_missing_members(err: RankFailureError, process_set: runtime.ProcessSet, position: int,
                         where: str) -> RankFailureError:
    """A user collective failed by the backend's timeout (``err``, as the runtime explained it): write where
    this rank is to the store, read the other members' records, and return ``err`` with the members that
    never arrived named and what each of them is in (see :meth:`StallInspector.name_missing`).

    Only this failure path touches the store: the healthy path of a user collective is the plain blocking
    wait (:mod:`shoal.core.collectives`, constraint 7). Members that time out in their own collective a
    moment later are waited for, a bounded time (:func:`_settle_s`).

    Args:
        err: the runtime's explanation of the backend error.
        process_set: the collective's process set.
        position: the call's number on that process set (the same on every member).
        where: the call as messages name it, e.g. ``"allreduce of 'x' (call 3 on process set [0, 1])"``.

    Returns:
        ``err`` itself when it is no timeout, names a dead rank, or no member is missing.
    """
    if "timed out" not in str(err) or _names_dead_rank(err):
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
    missing member has a record. Its peers are polled 0.1 s doubling to 2 s (constraint 8): at 32 s, 21
    reads (the first pass and 20 polls of the still-missing members), where a fixed 0.1 s made 320 of
    every member."""
    return min(60.0, max(_SETTLE_S, 0.1 * runtime.config().timeout_s + 2.0))


# ---------------------------------------------------------------------------------------------------------
# The per-step negotiation
# ---------------------------------------------------------------------------------------------------------

#: Negotiators per process-set ranks, in creation order (weak: an optimizer that is gone drops out).
_registry: dict[tuple[int, ...], list[tuple[Any, "weakref.ref[Negotiator]"]]] = {}
_join_calls: dict[tuple[int, ...], int] = {}


def _alive(ps: runtime.ProcessSet) -> list["Negotiator"]:
    token = _world_token()
    out = []
    for tok, ref in _registry.get(ps.ranks, []):
        n = ref()
        if n is not None and tok is token:
            out.append(n)
    return out


class Negotiator:
    """Per-step agreement on which gradients every rank produced, for one set of named tensors.

    A frontend creates one per optimizer (after validating its own arguments: creation is collective), hands
    it to the :class:`~shoal.core.reducer.GradientReducer` (``negotiator=``), and calls :meth:`finish`
    instead of ``reducer.finish()``.

    Args:
        entries: ``(name, shape, dtype)`` of every tensor, in the frontend's index order.
        process_set: the ranks that reduce these tensors (default: all).
        mode: ``auto`` / ``always`` / ``off`` (default: the ``negotiation`` knob).
        what: names the owner in messages.
        owner: the frontend object; :func:`join` calls its ``zero_grad()`` and ``synchronize()`` to shadow
            a step (held weakly).
        nan_check: the owner's NaN/Inf policy (default: the ``nan_check`` knob); it, ``mode`` and
            ``check_every_steps`` are part of the registration digest (constraint 7).
        check_every_steps: in static mode, run the full negotiation every this many steps anyway
            (constraint 4; default ``_CHECK_EVERY_STEPS``).
        settings: the owner's other resolved settings that decide which collectives a step runs (e.g.
            ``{"fusion_threshold_mb": 25.0, "backward_passes_per_step": 1}``), added to the digest.

    Raises:
        MismatchError: the registration check failed (see :func:`check_registration`), or ranks have
            different values of a setting (``negotiation``, ``nan_check``, ``check_every_steps``, one of
            ``settings``), named with each rank's value.

    Example (what a frontend does)::

        neg = Negotiator([(n, tuple(p.shape), p.dtype) for n, p in named], owner=self)
        red = GradientReducer(specs, negotiator=neg)
        ... hooks count firings per tensor in `counts` ...
        none_have = neg.finish(red, counts)     # instead of red.finish()
        for i in none_have: params[i].grad = None
    """

    def __init__(self, entries: Sequence[Entry], process_set: Optional[runtime.ProcessSet] = None, *,
                 mode: Optional[str] = None, what: str = "DistributedOptimizer", owner: Any = None,
                 nan_check: Optional[str] = None, check_every_steps: int = _CHECK_EVERY_STEPS,
                 settings: Optional[dict[str, Any]] = None):
        cfg = runtime.config()
        self.process_set = runtime.get_process_set(process_set)
        self.mode = mode or getattr(cfg, "negotiation", "auto")
        if self.mode not in NEGOTIATION_MODES:
            raise ValueError(f"shoal: negotiation={self.mode!r} is not one of {', '.join(NEGOTIATION_MODES)} "
                             "(HINT: check SHOAL_NEGOTIATION)")
        self.what = what
        self.names = [str(e[0]) for e in entries]
        self.num_tensors = len(self.names)
        self.world = self.process_set.size()
        if check_every_steps < 1:
            raise ValueError(f"shoal: check_every_steps must be >= 1, got {check_every_steps}")
        #: Static mode: the full negotiation runs in every step whose number is a multiple of this.
        self.check_every_steps = int(check_every_steps)
        agreed = {**(settings or {}), "negotiation": self.mode,
                  "nan_check": nan_check or getattr(cfg, "nan_check", "off"),
                  "check_every_steps": self.check_every_steps}
        self.digest = check_registration(entries, self.process_set, what, settings=agreed)
        #: Whether any collective is needed at all (a world of one has nothing to agree on).
        self.active = self.world > 1
        self._owner = weakref.ref(owner) if owner is not None else None
        self._words = (self.num_tensors + 63) // 64
        self._full = (1 << self.num_tensors) - 1
        #: Completed steps (``finish`` calls); compared across ranks by the full negotiation.
        self.step = 0
        #: True while no per-step collective runs (constraint 4).
        self.static = False
        self._stable_steps = 0
        self._last_local: Optional[int] = None
        self._none_bits = 0
        self._none_have: list[int] = []
        #: Firings per backward pass, per tensor index, where more than one (constraint 5).
        self._fires: dict[int, int] = {}
        self._extra: dict[int, tuple[int, int]] = {}
        self._errors: list[str] = []
        self._launched: set[int] = set()
        self._slot: Optional[torch.Tensor] = None
        self._slot_value = 0.0
        #: Set by :func:`join` on this rank; ``some_joined``/``all_joined`` from the last negotiation.
        self.joined = False
        self.some_joined = False
        self.all_joined = False
        #: Full negotiations run (for tests and benchmarks).
        self.negotiations = 0
        #: The reducer's futures of this step and their tensor names (see :meth:`wait`), for messages.
        self._buckets: tuple[Sequence[Optional[torch.futures.Future]], Optional[Callable[[int], list[str]]]] \
            = ((), None)
        entry_list = _registry.setdefault(self.process_set.ranks, [])
        index = sum(1 for tok, _ in entry_list if tok is _world_token()) if self.active else 0
        self.stall = StallInspector(self.process_set, f"ps{self.process_set.process_set_id}/n{index}", what)
        if self.active:
            entry_list.append((_world_token(), weakref.ref(self)))

    # ------------------------------------------------------------------------------------ frontend calls
    def fires(self, i: int) -> int:
        """How many times tensor ``i``'s gradient fires per backward pass (learned; usually 1)."""
        return self._fires.get(i, 1)

    def note_extra_firing(self, i: int, count: int, passes: int, bucket: Optional[int]) -> None:
        """Tensor ``i`` fired again after it was marked ready (its ``count``-th firing in this step, over
        ``passes`` backward passes). ``bucket``: its bucket in the reducer, None before the reducer exists."""
        self._extra[i] = (max(count, self._extra.get(i, (0, passes))[0]), passes)
        if bucket is not None and bucket in self._launched and not any(f"'{self.names[i]}'" in e
                                                                      for e in self._errors):
            self._errors.append(
                f"gradient of '{self.names[i]}' fired again (firing {count}) after its bucket {bucket} went "
                f"on the wire on rank {runtime.rank()}: this step's reduced value of that bucket is wrong")

    def extend_last_bucket(self, buffer: torch.Tensor) -> torch.Tensor:
        """Called by the reducer when it (re)allocates its buffers: append the control slot (auto mode)."""
        if not self.active or self.mode != "auto":
            self._slot = None
            return buffer
        out = torch.zeros(buffer.numel() + _SLOT_NUMEL, dtype=buffer.dtype, device=buffer.device)
        out[:buffer.numel()].copy_(buffer)
        self._slot = out[buffer.numel():buffer.numel() + 1]
        return out

    def on_launch(self, bucket: int, num_buckets: int) -> None:
        """Called by the reducer right before bucket ``bucket`` goes on the wire."""
        self._launched.add(bucket)
        if bucket == num_buckets - 1 and self._slot is not None:
            self._slot.fill_(1.0 if (self._slot_value or self._errors) else 0.0)

    def wait(self, futures: Sequence[Optional[torch.futures.Future]],
             names_of: Optional[Callable[[int], list[str]]] = None) -> None:
        """Called by the reducer before it waits for its buckets: the stall inspector."""
        if self.active:
            self._buckets = (futures, names_of)  # for messages, should the negotiation fail meanwhile
            self.stall.wait(futures, self.step, names_of, where=self._where)  # formatted only if slow

    def finish(self, reducer, counts: Sequence[int], sparse: Sequence[int] = ()) -> list[int]:
        """Finish the step: ``reducer.finish()`` plus the negotiation (constraints 1-4).

        Args:
            reducer: the :class:`~shoal.core.reducer.GradientReducer` of this step.
            counts: per tensor index, how many times its gradient fired this step (0: not produced).
            sparse: indices reduced outside the reducer (their presence keeps ``auto`` out of static mode).

        Returns:
            Indices of the tensors no rank produced (the frontend drops their gradients).
        Raises:
            MismatchError: on every rank, when ranks diverged (a rank produced nothing while others did,
                different steps or optimizers, a gradient fired after its bucket left); names ranks and
                tensors.
            RankFailureError / StallError: a peer died, left, or never arrived; names it.
        """
        if not self.active or self.mode == "off":
            self._finish_reducer(reducer)
            self.step += 1
            self._end_step(None)
            return []
        produced = _pack(counts)
        flags = 0
        if self.joined:
            flags |= _JOINED
        elif produced == 0 and self.num_tensors:
            flags |= _EMPTY
        if produced != self._last_local:
            flags |= _CHANGED
        if self._errors:
            flags |= _ERROR
        vector = self._vector(produced, flags)
        if self.static and not sparse:
            self._slot_value = 1.0 if flags & (_CHANGED | _ERROR | _JOINED | _EMPTY) else 0.0
            self._finish_reducer(reducer)
            raised = self._take_slot()
            periodic = (self.step + 1) % self.check_every_steps == 0
            if not raised and not periodic:
                if self._errors:  # found after the slot had left: only this rank can say it
                    raise ShoalError(f"shoal: {self._errors[0]}. HINT: see docs/robustness.md (gradients "
                                     "that fire several times).")
                self.step += 1
                self._end_step(produced)
                return self._none_have
            result = self._wait_exchange(self._start_exchange(vector))
            if raised:  # a rank deviated: negotiate every step again until the model looks static
                self.static, self._stable_steps = False, -1
        else:
            pending = self._start_exchange(vector)
            self._finish_reducer(reducer)
            result = self._wait_exchange(pending)
        self._interpret(result, produced, flags, bool(sparse))
        self.step += 1
        self._end_step(produced)
        return self._none_have

    def shadow_round(self) -> None:
        """One step with no gradient of this rank (inside :func:`join`): the owner zeroes and synchronizes."""
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            raise ShoalError(f"shoal: join() cannot shadow a {self.what} that no longer exists")
        owner.zero_grad()
        owner.synchronize()

    # ------------------------------------------------------------------------------------ internals
    def _where(self) -> str:
        """What this rank is in, for messages and its peers (the stall inspector's ``doing`` record)."""
        return f"step {self.step} of {self.what}" + (" (inside join())" if self.joined else "")

    def _awaited_vector(self) -> str:
        return f"the negotiation bit vector ({self._covered()})"

    def _covered(self) -> str:
        """The tensors the negotiation vector covers, for messages."""
        return f"{self.num_tensors} tensor{'s' if self.num_tensors != 1 else ''}: {_shown(self.names)}"

    def _vector(self, produced: int, flags: int) -> torch.Tensor:
        v = _words(produced, self._words) + [flags, self.step, self.digest]
        return torch.tensor(v + [~w for w in v], dtype=torch.int64)

    def _start_exchange(self, vector: torch.Tensor):
        self.negotiations += 1
        try:
            work = dist.all_reduce(vector, op=dist.ReduceOp.BAND, group=_control_group(self.process_set),
                                   async_op=True)
        except RuntimeError as exc:
            raise self._explain(exc, "negotiation bit-vector allreduce") from exc
        return work.get_future(), vector

    def _wait_exchange(self, pending) -> list[int]:
        fut, vector = pending
        with _timeline.span("negotiation", "bit-vector exchange", "main", {"step": self.step + 1}):
            self.stall.wait([fut], self.step, where=self._where, awaited=self._awaited_vector)
            try:
                fut.wait()
            except RuntimeError as exc:
                raise self._explain(exc, "negotiation bit-vector allreduce") from exc
        return vector.tolist()

    def _finish_reducer(self, reducer) -> None:
        try:
            reducer.finish()  # its stall wait gave a closing peer time to be seen dead (_await_exit)
        except RankFailureError as err:
            raise self._with_context(err) from err.__cause__

    def _take_slot(self) -> bool:
        if self._slot is None:
            return False
        value = float(self._slot.item())
        self._slot.zero_()
        return value != 0.0

    def _end_step(self, produced: Optional[int]) -> None:
        for i, (count, passes) in self._extra.items():
            self._fires[i] = max(self.fires(i), -(-count // max(passes, 1)))
        self._extra.clear()
        self._errors.clear()
        self._launched.clear()
        # The reducer's futures of this step (and what they hold: 16-bit wire copies, the reduced buckets)
        # would otherwise stay alive through the next forward and backward.
        self._buckets = ((), None)
        self._last_local = produced
        # An early launch of the last bucket means every tensor was produced (constraint 4).
        self._slot_value = 1.0 if (self.static and produced is not None and produced != self._full) else 0.0

    def _interpret(self, result: list[int], produced: int, flags: int, has_sparse: bool) -> None:
        n = self._words + 3
        all_w, none_w = result[:n], result[n:]
        c, s, d = self._words, self._words + 1, self._words + 2

        def same(k: int) -> bool:
            return (all_w[k] | none_w[k]) == -1

        def anyone(flag: int) -> bool:
            return not none_w[c] & flag

        none_bits = _unwords(none_w[:self._words]) & self._full
        someone_produced = none_bits != self._full
        if not same(s) or not same(d) or anyone(_ERROR) or (anyone(_EMPTY) and someone_produced):
            self._raise_divergence(produced, flags)
        self.some_joined = anyone(_JOINED)
        self.all_joined = bool(all_w[c] & _JOINED)
        if none_bits != self._none_bits:
            self._none_bits = none_bits
            self._none_have = _indices(none_bits)
        if anyone(_CHANGED) or self.some_joined or has_sparse or self.mode != "auto":
            self._stable_steps = 0
            self.static = False
        else:
            self._stable_steps += 1
            if self._stable_steps >= _STATIC_AFTER_STEPS and not self.static:
                self.static = True
                log.debug("shoal: %s: no rank's gradient set changed for %d steps: static mode",
                          self.what, self._stable_steps)

    def _raise_divergence(self, produced: int, flags: int) -> None:
        """Slow path, taken by every rank together: gather details, raise the same message everywhere."""
        me = runtime.rank()
        mine = {"rank": me, "step": self.step, "digest": self.digest, "flags": flags,
                "count": bin(produced).count("1"),
                "names": [self.names[i] for i in _indices(produced)[:3]],
                "missing": [self.names[i] for i in _indices(self._full & ~produced)[:3]],
                "registered": self.names[:3], "num_tensors": self.num_tensors,
                "errors": list(self._errors)}
        details: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(details, mine, group=_control_group(self.process_set))
        except RuntimeError as exc:
            raise self._explain(exc, "negotiation details exchange") from exc
        raise MismatchError(_divergence_message(details, self.what, self.num_tensors))

    def _explain(self, exc: BaseException, what: str) -> RankFailureError:
        """The runtime's explanation, waiting briefly for a peer that closed its connection to be seen
        dead (it usually is exiting: that is what closed the connection), plus the join hint."""
        futures, names_of = self._buckets
        flying = [b for b, f in enumerate(futures) if f is not None and not f.done()]
        in_flight = ""
        if flying and names_of is not None:
            in_flight = "; buckets in flight: " + ", ".join(f"{b} ({_shown(names_of(b))})" for b in flying[:3])
        label = f"{what} of {self.what} (step {self.step}; it covers {self._covered()}{in_flight})"
        err = runtime.explain_failure(exc, label, self.process_set.ranks)
        if _peer_closed(exc):
            deadline = time.monotonic() + _EXIT_GRACE_S
            while not _names_dead_rank(err) and time.monotonic() < deadline:
                time.sleep(0.05)
                err = runtime.explain_failure(exc, label, self.process_set.ranks)
        return self._with_context(err)

    def _with_context(self, err: RankFailureError) -> RankFailureError:
        """Add who never arrived (a timeout) or the join hint (a peer gone)."""
        if "timed out" in str(err) and not _names_dead_rank(err):
            return self.stall.name_missing(err, self.step)
        if not _names_dead_rank(err) or "join()" in str(err):
            return err
        return RankFailureError(
            f"{err}\nHINT: if that rank ended its training loop early (fewer batches than the others: uneven "
            "inputs) rather than crashing, call shoal.torch.join() after the loop on every rank, so that "
            "ranks with data left finish it while the others contribute zeros.")


def _divergence_message(details: list[dict], what: str, num_tensors: int) -> str:
    ranks = [d["rank"] for d in details]
    lines: list[str] = []
    steps = {d["step"] for d in details}
    digests = {d["digest"] for d in details}
    if len(digests) > 1:
        groups: dict[int, list[dict]] = {}
        for d in details:
            groups.setdefault(d["digest"], []).append(d)
        held = "; ".join(f"{_format_ranks([d['rank'] for d in ds])}: a {what} of {ds[0]['num_tensors']} "
                         f"tensors ({_shown(ds[0]['registered'])}) at step {ds[0]['step']}"
                         for ds in groups.values())
        lines.append(f"shoal: ranks are synchronizing different {what}s at this point (registration digests "
                     f"differ): {held}")
        hint = ("every rank must step the same optimizers in the same order; inside join(), the joined ranks "
                "shadow every optimizer that stepped since the last join.")
    elif len(steps) > 1:
        lines.append(f"shoal: ranks are at different steps of {what}: " + "; ".join(
            f"rank {d['rank']}: step {d['step']}, " + (f"{d['count']} of {num_tensors} gradients produced "
                                                       f"({_shown(d['names'])})" if d["count"] else
                                                       "no gradient produced") for d in details))
        hint = "every rank must call optimizer.step() (or synchronize()) the same number of times."
    else:
        hint = ""
    empty = [d for d in details if d["flags"] & _EMPTY]
    full = [d for d in details if not d["flags"] & (_EMPTY | _JOINED)]
    if empty and full:
        example = full[0]
        lines.append(
            f"shoal: {_format_ranks([d['rank'] for d in empty])} produced no gradient in step "
            f"{details[0]['step']} of {what}, while {_format_ranks([d['rank'] for d in full])} produced "
            f"{example['count']} of {num_tensors} (e.g. {_shown(example['names'])}): "
            f"{'that rank' if len(empty) == 1 else 'those ranks'} skipped loss.backward() (or ran it on "
            "nothing) before optimizer.step()")
        hint = hint or ("every rank must run backward before optimizer.step(); a rank that ran out of data "
                        "must leave the loop and call shoal.torch.join() (every rank does, after its loop).")
    for d in details:
        for e in d["errors"]:
            lines.append(f"shoal: {e}")
            hint = hint or ("a gradient fired more times than in the steps before, after its bucket was on "
                            "the wire (reentrant checkpointing whose pattern changed); from the next step on "
                            "Shoal waits for the new number of firings. See docs/robustness.md.")
    if not lines:
        lines.append(f"shoal: ranks diverged in {what} (ranks {ranks})")
    return "\n".join(lines) + "\nHINT: " + (hint or "make every rank run the same steps.")


# ---------------------------------------------------------------------------------------------------------
# Join (uneven inputs)
# ---------------------------------------------------------------------------------------------------------

def join(process_set: Optional[runtime.ProcessSet] = None) -> int:
    """This rank has finished its data: shadow the other ranks' optimizer steps with zero gradients until
    every rank has called ``join``; return the rank that joined last (Horovod's ``hvd.join()``).

    Every :class:`Negotiator` of ``process_set`` that has stepped (all of them if none has) is shadowed, in
    creation order, once per round: its owner's ``zero_grad()`` then ``synchronize()``, which contributes
    zeros and the "joined" flag to the others' negotiation. ``Average`` still divides by the full size of the
    process set, as Horovod does (its averaging is a postscale by ``1 / process_set size``), so a joined
    rank's zeros pull the average toward zero exactly as a rank with a zero gradient would.

    Only the optimizer's gradient reduction is shadowed: a user collective that the other ranks call
    while this one is joined finds no partner. This rank raises ``StallError`` at ``stall_timeout_s``,
    the others ``RankFailureError`` at ``timeout_s``, each naming the other and where it is (this rank:
    "step k of DistributedOptimizer (inside join())"; the others: the collective's name and call number),
    through the stall inspector's records.

    Returns:
        The global rank of the last rank to call ``join`` (by arrival at the rendezvous store).
    Raises:
        ShoalError: an optimizer has ``negotiation="off"`` (joined ranks could not signal).

    Example:
        >>> for batch in my_batches:       # a different count on each rank
        ...     opt.zero_grad(); loss(model(batch)).backward(); opt.step()
        >>> last = hvd.join()
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    """
    ps = runtime.get_process_set(process_set, "join")
    me = runtime.rank()
    if ps.size() == 1:
        return me
    negotiators = _alive(ps)
    off = [n for n in negotiators if n.mode == "off"]
    if off:
        raise ShoalError(f"shoal: join() needs the per-step negotiation, but a {off[0].what} on process set "
                         f"{list(ps.ranks)} has negotiation='off'. HINT: set SHOAL_NEGOTIATION=auto.")
    used = [n for n in negotiators if n.step > 0] or negotiators
    calls = _join_calls.get(ps.ranks, 0)
    _join_calls[ps.ranks] = calls + 1
    order = 0
    store = _store()
    if store is not None:
        try:
            order = int(store.add(f"shoal/join/ps{ps.process_set_id}/{calls}", 1))
        except RuntimeError:
            order = 0
    for n in used:
        n.joined = True
    try:
        while used:
            every_rank_joined = True
            for n in used:
                n.shadow_round()
                every_rank_joined = every_rank_joined and n.all_joined
            if every_rank_joined:
                break
    finally:
        for n in used:
            n.joined = False
            n.all_joined = False
    last = torch.tensor([(order << 32) | me], dtype=torch.int64)
    try:
        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=_control_group(ps))
    except RuntimeError as exc:
        raise runtime.explain_failure(exc, "join", ps.ranks) from exc
    return int(last.item()) & 0xFFFFFFFF
