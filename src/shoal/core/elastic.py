"""Elastic training, the worker's side: a lost rank costs seconds, not the job.

Horovod's contract, for every frontend: the user's training function runs under :func:`run` with a
:class:`State` (model, optimizer, user fields such as ``epoch`` and ``batch``) that the script commits now
and then. When a peer dies, hangs or leaves, the collective that meets it raises
:class:`~shoal.core.errors.HorovodInternalError` on every survivor; :func:`run` catches it, the survivors
agree on the next generation (:mod:`shoal.core.membership`), leave the old world and build the new one in
this process (:func:`shoal.core.runtime.leave_world` / :func:`~shoal.core.runtime.enter_world`), bring the
state back to where every member agrees, copy it from rank 0 (a survivor) to everyone (new workers too),
and call the function again. Workers waiting to join, and workers leaving on SIGTERM, change the membership
at the next commit (:class:`~shoal.core.errors.HostsUpdatedInterrupt`, on every rank alike).

Design constraints:

1. No cost while nothing fails. Detection is the failing collective itself (a dead peer closes its
   connections: the survivors' next collective fails within milliseconds; a hung one is named by the
   stall inspector at ``stall_timeout_s``). Nothing polls per step; a commit costs one read of the job's
   store and one 8-byte allreduce (the decision must be the same on every rank).
2. Keep what every survivor has. After a failure the survivors compare, in the closed generation's
   record, how many steps each completed and whether any was partly through an update: when all finished
   the same step and none was partly through one, nobody restores (no work is lost); otherwise everyone
   restores the last commit. Then ``sync()`` copies rank 0's state to every member either way.
3. Leaving on SIGTERM (a preemption notice) is graceful: the rank finishes its step, the job changes
   membership at the next commit, and nobody restores anything (no step is lost).
4. One implementation: the frontends (``shoal.torch.elastic``, ``shoal.keras.elastic``) only say how their
   state is saved, restored and copied.

What lives elsewhere: the agreement in the job's store (:mod:`shoal.core.membership`), the worlds of
process groups (:mod:`shoal.core.runtime`), starting and replacing workers (:mod:`shoal.runner.elastic`).
"""

from __future__ import annotations

import copy
import functools
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import membership, runtime
from .errors import HorovodInternalError, HostsUpdatedInterrupt, ShoalError
from .membership import ElasticMembershipError

__all__ = ["State", "ObjectState", "run", "check_host_updates", "reset", "leaving", "forming", "request_leave",
           "generation",
           "note_partial_update", "ResetOutcome", "recovery_times", "entered", "register_unwrapper",
           "peer_reported_gone"]

log = logging.getLogger(__name__)

_store: Optional[dist.Store] = None
_member: Optional[membership.Member] = None
_leaving = False
_dirty = False
#: completed_steps() when this generation began: survivors compare the steps done in it (constraint 2).
_steps_base = 0
#: membership.gone_count() when this generation began (peer_reported_gone).
_gone_base = 0
#: Seconds of each phase of the last reset (detect, agree, rebuild, restore, first step), for reports.
_times: dict[str, float] = {}


def entered(store: dist.Store, member: membership.Member) -> None:
    """Called by ``init()`` of an elastic worker once it is in a generation."""
    global _store, _member, _steps_base, _gone_base
    _store, _member = store, member
    _steps_base = _completed_steps()
    _gone_base = membership.gone_count(store)


def peer_reported_gone() -> bool:
    """Whether the launcher reported a worker gone since this generation began: a failure then need not wait
    to see a dead peer on this host (the one that died may be on another host, whose pids cannot be seen
    from here: :func:`shoal.core.runtime.explain_failure` waited its whole grace for it, 2 s per failure)."""
    if _store is None:
        return False
    try:
        return membership.gone_count(_store) > _gone_base
    except RuntimeError:
        return False


def forming() -> bool:
    """True when peers already started the next generation (the stall inspector's check while it waits)."""
    return _store is not None and _member is not None and membership.started(_store, _member.generation + 1)


def leaving() -> bool:
    """True once this rank was asked to leave (SIGTERM under :func:`run`)."""
    return _leaving


def request_leave(*_args: Any) -> None:
    """Leave the job at the next commit (constraint 3); the SIGTERM handler of :func:`run`."""
    global _leaving
    if not _leaving:
        _leaving = True
        log.warning("shoal: rank %s asked to leave the elastic job: it finishes its step and leaves at the next "
                    "commit", runtime.rank() if runtime.is_initialized() else "?")


def note_partial_update() -> None:
    """A failure interrupted an update that had started (the overlapped step): restoring is needed."""
    global _dirty
    _dirty = True


def generation() -> int:
    """The number of the elastic job's current generation (0: the first; one more at each change of
    membership). Outside an elastic job: the number of ``init()`` calls of this process so far."""
    return runtime.generation()


def recovery_times() -> dict[str, float]:
    """The last change of membership on this rank, phase by phase, in seconds: ``leave`` (the old world's
    groups torn down), ``agree`` (the next generation, in the job's store), ``rebuild`` (its groups),
    ``restore`` (back to the last commit, 0 when the state was kept), ``sync`` (the state copied from rank
    0), ``since_failure`` (from catching the failure to the end of ``restore``). Two stamps: ``failed_at``
    (``time.time()`` when this rank caught the failure or the interrupt: compare it with the time of the
    fault itself to get the detection time) and ``kept`` (1.0 when the survivors kept their state, 0.0
    when it went back to the last commit). Empty before the first change.

    Example:
        >>> hvd.elastic.recovery_times()
        {'leave': 0.004, 'agree': 0.41, 'rebuild': 0.09, 'restore': 0.0, 'since_failure': 0.51,
         'failed_at': 1796543210.2, 'kept': 1.0, 'sync': 0.03}
    """
    return dict(_times)


@dataclass(frozen=True, slots=True)
class ResetOutcome:
    """What a reset decided: the new place, and whether the state was kept (constraint 2)."""

    member: membership.Member
    keep: bool


def _completed_steps() -> int:
    from .step import completed_steps  # noqa: PLC0415 (step imports this module's users)

    return completed_steps()


def reset() -> ResetOutcome:
    """Leave this generation and join the next: the survivors' side of a failure or of a commit that
    changes membership. Every survivor calls it; joiners are taken in by the agreement.

    Raises:
        ElasticMembershipError: this worker is not in the next generation (evicted), or too few are left.
        ShoalError: not an elastic worker.
    """
    global _member, _dirty, _steps_base, _gone_base
    if _member is None or _store is None:
        raise ShoalError("shoal: elastic reset outside an elastic job. HINT: launch with shoal run --min-np/"
                         "--max-np (or -np with --elastic), or catch the error yourself.")
    start = time.monotonic()
    cfg = runtime.config()
    info = {"steps": _completed_steps() - _steps_base, "dirty": _dirty}
    left = runtime.leave_world()
    t_left = time.monotonic()
    previous = _member
    for attempt in range(1, membership.FORM_ATTEMPTS + 1):
        member = membership.agree(_store, previous, info, cfg)
        t_agreed = time.monotonic()
        try:
            runtime.enter_world(left, member.rank, member.size, member.generation)
            break
        except Exception as exc:  # noqa: BLE001 (a member did not come: the next generation goes on without it)
            if attempt == membership.FORM_ATTEMPTS:
                raise ElasticMembershipError(
                    f"shoal: rank {member.rank}: {attempt} generations of the elastic job in a row failed to "
                    f"form (the last: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}). HINT: check that "
                    "the workers reach each other (shoal doctor); raise SHOAL_TIMEOUT_S on a slow machine.") from exc
            log.warning("shoal: elastic generation %d did not form on rank %d (%s: %s); the next one goes on "
                        "without the workers that did not come", member.generation, member.rank,
                        type(exc).__name__, str(exc).splitlines()[0][:200])
            previous = member
    t_built = time.monotonic()
    survivors = [r for r in member.records if r.get("prev", -1) >= 0]
    keep = bool(survivors) and len({r.get("steps") for r in survivors}) == 1 and \
        not any(r.get("dirty") for r in survivors)
    _member, _dirty, _steps_base = member, False, _completed_steps()
    _gone_base = membership.gone_count(_store)
    _times.update({"leave": t_left - start, "agree": t_agreed - t_left, "rebuild": t_built - t_agreed})
    log.warning("shoal: elastic generation %d: rank %d of %d (%d survivors, %d joined); %s", member.generation,
                member.rank, member.size, member.survivors, member.size - member.survivors,
                "state kept: every survivor finished the same step" if keep else "state restored to the last commit")
    return ResetOutcome(member, keep)


def check_host_updates() -> None:
    """Raise :class:`~shoal.core.errors.HostsUpdatedInterrupt` on every rank alike when workers wait to join
    or a rank leaves (constraints 1, 3): one read of the job's store and one 8-byte allreduce."""
    if _store is None or not runtime.is_initialized() or not runtime.elastic():
        return
    joins = membership.pending_joins(_store) > 0
    if _leaving:  # recorded before the others learn of it, so that their agreement never waits for this rank
        membership.note_leave(_store, membership.worker_id())
    flags = torch.tensor([int(joins), int(_leaving)], dtype=torch.int64)
    try:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=runtime.control_group(runtime.global_process_set))
    except RuntimeError as exc:  # a peer lost at the commit: a failure like any other
        raise runtime.explain_failure(exc, "the elastic commit's membership check") from exc
    if flags.any():
        raise HostsUpdatedInterrupt(skip_sync=not bool(flags[0]))


class State:
    """What survives a change of membership: saved by :meth:`commit`, brought back by :meth:`restore`,
    copied from rank 0 by :meth:`sync` (Horovod's ``hvd.elastic.State``). Frontends subclass it.

    Example:
        >>> state = hvd.elastic.TorchState(model, optimizer, epoch=0, batch=0)
        >>> @hvd.elastic.run
        ... def train(state): ...
    """

    def __init__(self) -> None:
        self._reset_callbacks: list[Callable[[], None]] = []

    def register_reset_callbacks(self, callbacks) -> None:
        """Call each of ``callbacks`` after every change of membership (e.g. to scale the learning rate by the
        new size)."""
        self._reset_callbacks.extend(callbacks)

    def keeps_progress(self) -> bool:
        """Whether this state holds the work done since the last commit when a failure interrupts it (then
        nobody restores when every survivor finished the same step). Every rank must answer alike."""
        return True

    def reset(self) -> None:
        """Called after every change of membership, before the reset callbacks (Horovod's hook for
        subclasses: rebuild what depends on the world's size)."""

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Save the state (in memory), then apply pending membership changes (may raise
        :class:`~shoal.core.errors.HostsUpdatedInterrupt`)."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise :class:`~shoal.core.errors.HostsUpdatedInterrupt` on every rank when workers join or leave."""
        check_host_updates()

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class ObjectState(State):
    """A state of plain fields (``epoch``, ``batch``, ...): copies saved and restored in memory, synced from
    rank 0 as plain data (numbers, strings, containers, tensors: no pickle). Horovod's ``ObjectState``.

    Args:
        **kwargs: the fields and their initial values; read and write them as attributes.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._fields = list(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._saved = copy.deepcopy(kwargs)

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def save(self) -> None:
        self._saved = copy.deepcopy(self._values())

    def restore(self) -> None:
        for name, value in copy.deepcopy(self._saved).items():
            setattr(self, name, value)

    def sync(self) -> None:
        if not self._fields or runtime.size() == 1:
            return
        from .collectives import broadcast_object  # noqa: PLC0415

        values = broadcast_object(self._values(), root_rank=0, name="elastic.state", trusted=False)
        for name, value in values.items():
            setattr(self, name, value)


_sigterm_installed = False


def _install_sigterm() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, request_leave)
    _sigterm_installed = True


def _leave_now() -> None:
    """This rank asked to leave and the job agreed at this commit: record it, leave the world, exit."""
    if _store is not None:
        membership.note_leave(_store, membership.worker_id())
    log.warning("shoal: rank %d left the elastic job at generation %d (SIGTERM)", runtime.rank(),
                runtime.generation())
    runtime.leave_world()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(0)


#: Frontend hooks that find Shoal's error inside a framework's own (see register_unwrapper).
_unwrappers: list[Callable[[BaseException], Optional[BaseException]]] = []


def register_unwrapper(fn: Callable[[BaseException], Optional[BaseException]]) -> None:
    """Let :func:`run` see Shoal's errors through a framework that wraps them: TensorFlow turns an exception
    raised in a host call (``tf.py_function``) into its own ``UnknownError``, JAX into an
    ``XlaRuntimeError``. ``fn(exc)`` returns the :class:`~shoal.core.errors.HorovodInternalError` or
    :class:`~shoal.core.errors.HostsUpdatedInterrupt` behind ``exc``, or None."""
    if fn not in _unwrappers:
        _unwrappers.append(fn)


def _unwrap(exc: BaseException) -> Optional[BaseException]:
    seen = exc
    while seen is not None:  # the chain first: a framework that re-raises keeps ours as a cause
        if isinstance(seen, (HorovodInternalError, HostsUpdatedInterrupt)):
            return seen
        seen = seen.__cause__ or seen.__context__
    for fn in _unwrappers:
        inner = fn(exc)
        if isinstance(inner, (HorovodInternalError, HostsUpdatedInterrupt)):
            return inner
    return None


def run(func: Callable) -> Callable:
    """Run ``func(state, ...)`` so that it survives changes of membership (Horovod's ``hvd.elastic.run``).

    The state is synced from rank 0 first; a :class:`~shoal.core.errors.HorovodInternalError` (a peer died,
    hung or left mid-collective) makes the survivors agree on the next generation, keep or restore the
    state (constraint 2) and call ``func`` again; a :class:`~shoal.core.errors.HostsUpdatedInterrupt`
    (raised by ``state.commit()`` when workers join or a rank leaves) does the same without restoring.
    SIGTERM makes this rank leave at the next commit. Outside an elastic job ``func`` just runs.

    Example:
        >>> @hvd.elastic.run
        ... def train(state):
        ...     for state.epoch in range(state.epoch, epochs):
        ...         ...; state.commit()
        >>> train(hvd.elastic.TorchState(model, optimizer, epoch=0))
    """
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any):
        _install_sigterm()
        skip_sync = False
        while True:
            try:
                # Inside the try: a peer lost while the state is copied is one more failure like any other
                # (what every survivor holds is still its own, or the same commit).
                t_sync = time.monotonic()
                if not skip_sync:
                    state.sync()
                if _times:
                    _times["sync"] = time.monotonic() - t_sync
                try:
                    return func(state, *args, **kwargs)
                except (HostsUpdatedInterrupt, HorovodInternalError):
                    raise
                except Exception as exc:  # noqa: BLE001 (a framework may wrap ours: see register_unwrapper)
                    inner = _unwrap(exc)
                    if inner is None:
                        raise
                    raise inner from exc
            except HostsUpdatedInterrupt as exc:
                if not runtime.elastic():
                    raise
                if _leaving:
                    _leave_now()
                caught = time.time()
                _times.clear()
                outcome = reset()
                _times.update(restore=0.0, failed_at=caught, kept=1.0)
                skip_sync = exc.skip_sync and outcome.member.size == outcome.member.survivors
            except HorovodInternalError as exc:
                if not runtime.elastic():
                    raise
                if _leaving:  # it asked to leave (and recorded it at the commit): it goes, failure or not
                    _leave_now()
                failed_at, caught = time.monotonic(), time.time()
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("shoal: rank %d: %s (the elastic job goes on without the ranks it names)",
                            runtime.rank(), text[len("shoal: "):] if text.startswith("shoal: ") else text)
                _times.clear()
                outcome = reset()
                t_restore = time.monotonic()
                if outcome.keep and not state.keeps_progress():
                    log.info("shoal: the state goes back to its last commit all the same: it does not hold the "
                             "work done since then (%s)", type(state).__name__)
                if not outcome.keep or not state.keeps_progress():
                    state.restore()
                _times["restore"] = time.monotonic() - t_restore
                _times.update(since_failure=time.monotonic() - failed_at, failed_at=caught,
                              kept=float(outcome.keep and state.keeps_progress()))
                skip_sync = False
            state.on_reset()
    return wrapper
