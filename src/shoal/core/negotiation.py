"""Decentralized negotiation: ranks agree, every step, on which gradients each of them produced, without a
coordinator, and fail loudly (naming the rank and the tensor) instead of hanging.

This module owns the per-step bit vector (:class:`Negotiator`): which gradients each rank produced,
combined by ONE small bitwise-AND allreduce, so that every rank knows which tensors all / some / none of
the ranks have; static-model detection (after a few identical steps the per-step collective is replaced by
one flag element riding in the last gradient bucket, plus a full check every 100 steps); and the
divergence errors it finds. It is one of the reducer's observers (:class:`shoal.core.reducer.
ReducerObserver`): it reserves the control slot after the last bucket, fills it before that bucket leaves,
and runs the stall inspector's wait.

What lives elsewhere: the registration check (:mod:`shoal.core.registration`), the stall inspector and its
store records (:mod:`shoal.core.stall`), join (:mod:`shoal.core.join`), the step it is part of and the
gradient counts it reads (:mod:`shoal.core.step`), pid liveness (:func:`shoal.core.runtime.explain_failure`).

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
   and errors. Its allreduce runs on the process set's control group (gloo: bitwise ops exist on gloo, not
   on NCCL; the bits are host state anyway), started before the last buckets and waited for with them.
3. Every decision is taken from reduced data, so it is the same on every rank: all ranks switch modes in
   the same step, and all take the slow path (one JSON exchange of details, to name ranks and tensors)
   together. Nothing can leave a rank waiting in a collective its peers skipped.
4. Static models do not pay a collective per step. After ``_STATIC_AFTER_STEPS`` steps in which no rank's
   set changed, a rank only compares its set with its own previous one; a rank that deviates writes 1 into
   a control slot appended to the last bucket (16 elements, one alignment unit), which every rank reads
   after the reduction: a non-zero sum sends every rank through the full negotiation in that same step.
   The last bucket is the one place a deviation can still ride: it goes on the wire only once every
   earlier gradient is ready, or in ``synchronize()`` when some never came. Every
   ``negotiation_check_steps`` steps (100) the full negotiation runs anyway (it also compares step counters and registration digests).
5. Gradients that fire several times in one backward pass (reentrant activation checkpointing runs a
   backward per segment) are marked ready on their last firing. How many firings that is, each rank learns
   locally: step 1 launches nothing early, so what it counts is safe; a firing beyond the learned count
   after the bucket went on the wire cannot be repaired (autograd adds into the buffer in flight) and is
   reported on every rank.
6. Ranks agree on the settings that decide which collectives a step runs: ``negotiation``, ``nan_check``,
   ``check_every_steps`` here, and what the step owner resolves and passes as ``settings=`` (bucket layout,
   streams, compression, hierarchy, backward passes per step, what the autotuner tunes). They are part of
   the registration digest (a one-time cost), so ranks configured differently fail at registration,
   naming the setting and each rank's value, instead of hanging in a collective only some of them start.

Steps are numbered from 1 in every message (the step owner's count), as the NaN report numbers them.

Glossary:
    produced   a gradient whose accumulation hook fired on this rank in this step
    none-have  produced by no rank: its gradient becomes ``None`` after the step's synchronization
    static     the mode in which no per-step collective runs (constraint 4)
    joined     a rank inside :func:`shoal.core.join.join`: it contributes zeros to the others' steps
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import exchange, runtime
from . import timeline as _timeline
from .buckets import ALIGN_NUMEL
from .config import NEGOTIATION_MODES
from .errors import MismatchError, RankFailureError, ShoalError, format_ranks, shown
from .reducer import ReducerObserver
from .registration import Entry, check_registration
from .stall import StallInspector

__all__ = ["NEGOTIATION_MODES", "Negotiator", "control_nbytes"]

log = logging.getLogger(__name__)

#: Steps in a row without any rank's set changing before ``auto`` stops negotiating every step.
_STATIC_AFTER_STEPS = 5
#: Elements appended to the last bucket for the static-mode flag (one alignment unit, see buckets.py).
_SLOT_NUMEL = ALIGN_NUMEL

# Flag bits of the control word.
_CHANGED = 1   # this rank's produced set differs from its previous step's
_EMPTY = 2     # this rank produced nothing (and is not joined)
_JOINED = 4    # this rank is inside join(): it shadows the step with zeros
_ERROR = 8     # this rank has an error to report on every rank (details on the slow path)

_MASK64 = (1 << 64) - 1

_JOIN_HINT = ("if that rank ended its training loop early (fewer batches than the others: uneven inputs) "
              "rather than crashing, call join() (hvd.join()) after the loop on every rank, so that ranks "
              "with data left finish it while the others contribute zeros.")


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


def control_nbytes(num_tensors: int) -> int:
    """Bytes one rank contributes to the per-step negotiation allreduce for ``num_tensors`` tensors."""
    return 2 * ((num_tensors + 63) // 64 + 3) * 8


#: Negotiators created per process set in the current world: the stall inspector's tag of each.
_counts: dict[tuple[int, ...], tuple[Any, int]] = {}


def _next_index(ps: runtime.ProcessSet) -> int:
    token = runtime.world_token()
    have = _counts.get(ps.ranks)
    index = have[1] if have is not None and have[0] is token else 0
    _counts[ps.ranks] = (token, index + 1)
    return index


class Negotiator(ReducerObserver):
    """Per-step agreement on which gradients every rank produced, for one set of named tensors.

    The step owner (:class:`shoal.core.step.StepOwner`) creates one per optimizer (collective: the
    registration check runs here), gives it to its reducer as an observer, and calls :meth:`finish`
    instead of ``reducer.finish()``.

    Args:
        entries: ``(name, shape, dtype)`` of every tensor, in the frontend's index order.
        process_set: the ranks that reduce these tensors (default: all).
        mode: ``auto`` / ``always`` / ``off`` (default: the ``negotiation`` knob).
        what: names the owner in messages.
        nan_check: the owner's NaN/Inf policy (default: the ``nan_check`` knob); it, ``mode`` and
            ``check_every_steps`` are part of the registration digest (constraint 6).
        check_every_steps: in static mode, run the full negotiation every this many steps anyway
            (constraint 4; default: the ``negotiation_check_steps`` knob, 100).
        settings: the owner's other resolved settings that decide which collectives a step runs (e.g.
            ``{"fusion_threshold_mb": 25.0, "backward_passes_per_step": 1}``), added to the digest.
        steps: the number of steps completed (the step owner's one counter); default: its own count.
        names: the tensors' names in messages, where they differ from the registered ones.

    Raises:
        MismatchError: the registration check failed (see :func:`shoal.core.registration.check_registration`),
            or ranks have different values of a setting, named with each rank's value.
    """

    def __init__(self, entries: Sequence[Entry], process_set: Optional[runtime.ProcessSet] = None, *,
                 mode: Optional[str] = None, what: str = "DistributedOptimizer",
                 nan_check: Optional[str] = None, check_every_steps: Optional[int] = None,
                 settings: Optional[dict[str, Any]] = None, steps: Optional[Callable[[], int]] = None,
                 names: Optional[Sequence[str]] = None):
        cfg = runtime.config()
        self.process_set = runtime.get_process_set(process_set)
        self.mode = mode or cfg.negotiation
        if self.mode not in NEGOTIATION_MODES:
            raise ValueError(f"shoal: negotiation={self.mode!r} is not one of {', '.join(NEGOTIATION_MODES)} "
                             "(HINT: check SHOAL_NEGOTIATION)")
        self.what = what
        self.names = [str(n) for n in names] if names is not None else [str(e[0]) for e in entries]
        self.num_tensors = len(self.names)
        self.world = self.process_set.size()
        check_every_steps = cfg.negotiation_check_steps if check_every_steps is None else check_every_steps
        if check_every_steps < 1:
            raise ValueError(f"shoal: check_every_steps must be >= 1, got {check_every_steps}")
        #: Static mode: the full negotiation runs in every step whose number is a multiple of this.
        self.check_every_steps = int(check_every_steps)
        agreed = {**(settings or {}), "negotiation": self.mode,
                  "nan_check": nan_check or cfg.nan_check,
                  "check_every_steps": self.check_every_steps}
        self.digest = check_registration(entries, self.process_set, what, settings=agreed)
        #: Whether any collective is needed at all (a world of one has nothing to agree on).
        self.active = self.world > 1
        self._own_steps = 0
        self._steps = steps if steps is not None else (lambda: self._own_steps)
        self._words = (self.num_tensors + 63) // 64
        self._full = (1 << self.num_tensors) - 1
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
        #: Whether this rank shadows the steps (set by join); ``some_joined`` / ``all_joined`` from the last
        #: negotiation.
        self.joined = False
        self.some_joined = False
        self.all_joined = False
        #: Full negotiations run (for the engine's summary, tests and benchmarks).
        self.negotiations = 0
        #: Seconds spent in :meth:`finish` outside the buckets' wait, summed over steps (what it costs).
        self.outside_s = 0.0
        self._waited_s = 0.0
        #: The reducer of the step in flight, for messages should the negotiation fail meanwhile.
        self._reducer = None
        self.tail_numel = _SLOT_NUMEL if self.active and self.mode == "auto" else 0
        tag = f"ps{self.process_set.process_set_id}/n{_next_index(self.process_set)}" if self.active else ""
        self.stall = StallInspector(self.process_set, tag, what, position=self._number)

    @property
    def step(self) -> int:
        """Steps completed (the step owner's counter)."""
        return self._steps()

    def _number(self) -> int:
        """The number of the step in progress (1-based), as messages and records name it."""
        return self._steps() + 1

    # ------------------------------------------------------------------------------- gradient firings
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

    def note_error(self, text: str) -> None:
        """Report ``text`` (naming this rank and the tensor) on every rank at this step's end (the error
        flag of the vector; static mode: the control slot, if the last bucket has not left yet)."""
        if text not in self._errors:
            self._errors.append(text)

    # ------------------------------------------------------------------------------- reducer events
    def on_buffers(self, reducer, tail: Optional[torch.Tensor]) -> None:
        self._slot = tail[:1] if tail is not None else None

    def before_launch(self, reducer, bucket: int, buffer: torch.Tensor, tensors) -> None:
        self._launched.add(bucket)
        if bucket == len(reducer.plans) - 1 and self._slot is not None:
            self._slot.fill_(1.0 if (self._slot_value or self._errors) else 0.0)

    def wants(self, event: str) -> bool:
        return event != "before_wait" or self.active

    def before_wait(self, reducer, futures, names_of) -> None:
        """The stall inspector (formats its messages only when the wait is slow)."""
        self._reducer = reducer
        self.stall.wait(futures, self._number(), names_of, where=self._where)

    # ------------------------------------------------------------------------------- the step
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
        start = time.perf_counter()
        self._waited_s = 0.0
        try:
            return self._finish(reducer, counts, sparse)
        finally:
            # What the negotiation adds to a step: its time outside the buckets' wait (two clock reads).
            self.outside_s += time.perf_counter() - start - self._waited_s

    def _finish(self, reducer, counts: Sequence[int], sparse: Sequence[int]) -> list[int]:
        self._reducer = reducer
        if not self.active or self.mode == "off":
            self._finish_reducer(reducer)
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
            periodic = self._number() % self.check_every_steps == 0
            if not raised and not periodic:
                if self._errors:  # found after the slot had left: only this rank can say it
                    raise ShoalError(f"shoal: {self._errors[0]}. HINT: see docs/robustness.md (gradients "
                                     "that fire several times).")
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
        self._end_step(produced)
        return self._none_have

    # ------------------------------------------------------------------------------------ internals
    def _where(self) -> str:
        """What this rank is in, for messages and its peers (the stall inspector's ``doing`` record)."""
        return f"step {self._number()} of {self.what}" + (" (inside join())" if self.joined else "")

    def _awaited_vector(self) -> str:
        return f"the negotiation bit vector ({self._covered()})"

    def _covered(self) -> str:
        """The tensors the negotiation vector covers, for messages."""
        return f"{self.num_tensors} tensor{'s' if self.num_tensors != 1 else ''}: {shown(self.names)}"

    def _vector(self, produced: int, flags: int) -> torch.Tensor:
        v = _words(produced, self._words) + [flags, self._number(), self.digest]
        return torch.tensor(v + [~w for w in v], dtype=torch.int64)

    def _start_exchange(self, vector: torch.Tensor):
        self.negotiations += 1
        try:
            work = dist.all_reduce(vector, op=dist.ReduceOp.BAND, group=runtime.control_group(self.process_set),
                                   async_op=True)
        except RuntimeError as exc:
            raise self._explain(exc, "negotiation bit-vector allreduce") from exc
        return work.get_future(), vector

    def _wait_exchange(self, pending) -> list[int]:
        fut, vector = pending
        with _timeline.span("negotiation", "bit-vector exchange", "main", {"step": self._number()}):
            self.stall.wait([fut], self._number(), where=self._where, awaited=self._awaited_vector)
            try:
                fut.wait()
            except RuntimeError as exc:
                raise self._explain(exc, "negotiation bit-vector allreduce") from exc
        return vector.tolist()

    def _finish_reducer(self, reducer) -> None:
        start = time.perf_counter()
        try:
            reducer.finish()
        except RankFailureError as err:
            raise self._with_context(err) from err.__cause__
        finally:
            self._waited_s += time.perf_counter() - start

    def _take_slot(self) -> bool:
        if self._slot is None:
            return False
        value = float(self._slot.item())
        self._slot.zero_()
        return value != 0.0

    def _end_step(self, produced: Optional[int]) -> None:
        self._own_steps += 1
        for i, (count, passes) in self._extra.items():
            self._fires[i] = max(self.fires(i), -(-count // max(passes, 1)))
        self._extra.clear()
        self._errors.clear()
        self._launched.clear()
        self._reducer = None
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
        """Slow path, taken by every rank together: gather details (JSON), raise the same message everywhere."""
        me = runtime.rank()
        mine = {"rank": me, "step": self._number(), "digest": self.digest, "flags": flags,
                "count": bin(produced).count("1"),
                "names": [self.names[i] for i in _indices(produced)[:3]],
                "missing": [self.names[i] for i in _indices(self._full & ~produced)[:3]],
                "registered": self.names[:3], "num_tensors": self.num_tensors,
                "errors": list(self._errors)}
        try:
            details = exchange.allgather_json(mine, group=runtime.control_group(self.process_set),
                                              device=torch.device("cpu"))
        except RuntimeError as exc:
            raise self._explain(exc, "negotiation details exchange") from exc
        empty = [d["rank"] for d in details if d["flags"] & _EMPTY]
        full = [d for d in details if not d["flags"] & (_EMPTY | _JOINED)]
        raise MismatchError(_divergence_message(details, self.what, self.num_tensors),
                            culprit_ranks=empty if full else ())

    def _explain(self, exc: BaseException, what: str) -> RankFailureError:
        """The runtime's explanation (it waits briefly for a peer that closed its connection to be seen
        gone), with the buckets in flight, who never arrived, or the join hint."""
        red = self._reducer
        flying = red.buckets_in_flight() if red is not None else []
        in_flight = ""
        if flying:
            in_flight = "; buckets in flight: " + ", ".join(f"{b} ({shown(red.names_of(b))})" for b in flying[:3])
        label = (f"{what} of {self.what} (step {self._number()}; it covers {self._covered()}{in_flight})")
        return self._with_context(runtime.explain_failure(exc, label, self.process_set.ranks))

    def _with_context(self, err: RankFailureError) -> RankFailureError:
        """Add who never arrived (a timeout) or the join hint (a peer gone)."""
        if err.timed_out and not err.dead_ranks:
            return self.stall.name_missing(err, self._number())
        if err.dead_ranks and not err.hint:
            return err.replace(hint=_JOIN_HINT)
        return err


def _divergence_message(details: list[dict], what: str, num_tensors: int) -> str:
    ranks = [d["rank"] for d in details]
    lines: list[str] = []
    steps = {d["step"] for d in details}
    digests = {d["digest"] for d in details}
    if len(digests) > 1:
        groups: dict[int, list[dict]] = {}
        for d in details:
            groups.setdefault(d["digest"], []).append(d)
        held = "; ".join(f"{format_ranks([d['rank'] for d in ds])}: a {what} of {ds[0]['num_tensors']} "
                         f"tensors ({shown(ds[0]['registered'])}) at step {ds[0]['step']}"
                         for ds in groups.values())
        lines.append(f"shoal: ranks are synchronizing different {what}s at this point (registration digests "
                     f"differ): {held}")
        hint = ("every rank must step the same optimizers in the same order; inside join(), the joined ranks "
                "shadow every optimizer that stepped since the last join.")
    elif len(steps) > 1:
        lines.append(f"shoal: ranks are at different steps of {what}: " + "; ".join(
            f"rank {d['rank']}: step {d['step']}, " + (f"{d['count']} of {num_tensors} gradients produced "
                                                       f"({shown(d['names'])})" if d["count"] else
                                                       "no gradient produced") for d in details))
        hint = "every rank must call optimizer.step() (or synchronize()) the same number of times."
    else:
        hint = ""
    empty = [d for d in details if d["flags"] & _EMPTY]
    full = [d for d in details if not d["flags"] & (_EMPTY | _JOINED)]
    if empty and full:
        example = full[0]
        lines.append(
            f"shoal: {format_ranks([d['rank'] for d in empty])} produced no gradient in step "
            f"{details[0]['step']} of {what}, while {format_ranks([d['rank'] for d in full])} produced "
            f"{example['count']} of {num_tensors} (e.g. {shown(example['names'])}): "
            f"{'that rank' if len(empty) == 1 else 'those ranks'} skipped loss.backward() (or ran it on "
            "nothing) before optimizer.step()")
        hint = hint or ("every rank must run backward before optimizer.step(); a rank that ran out of data "
                        "must leave the loop and call join() (hvd.join()) (every rank does, after its loop).")
    for d in details:
        for e in d["errors"]:
            text, _, own_hint = str(e).partition(" HINT: ")
            lines.append(f"shoal: {text}")
            hint = hint or own_hint or (
                "a gradient fired more times than in the steps before, after its bucket was on the wire "
                "(reentrant checkpointing whose pattern changed); from the next step on Shoal waits for the "
                "new number of firings. See docs/robustness.md.")
    if not lines:
        lines.append(f"shoal: ranks diverged in {what} (ranks {ranks})")
    return "\n".join(lines) + "\nHINT: " + (hint or "make every rank run the same steps.")
