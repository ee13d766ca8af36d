"""Join (uneven inputs): a rank out of data shadows the other ranks' steps with zeros until every rank has
joined, with Horovod's semantics. One mechanism for every frontend (``shoal.torch.join``,
``shoal.keras.join``).

Design constraints:

1. The others' optimizer steps: a joined rank runs shadow steps (zero gradients, the "joined" flag in the
   per-step negotiation) for the step owners of the loop it left, until the negotiation says every member
   has joined.
2. The others' user collectives: a joined rank also answers them, as Horovod's joined ranks do: zeros to
   an allreduce (Sum, Average, Adasum; Average still divides by the whole set), a barrier passes, and any
   other collective fails at once on the others with an error naming the joined ranks (a timeout before).
   Shadow steps block in their negotiation (stream and control groups) until the others step, so the
   answers come from a second thread (only when there are step owners to shadow; otherwise the caller
   answers). Both use the set's own group, the answers for the others' calls and the shadow steps for
   tuning and checks after their negotiation; they never overlap there, because a member asks for an
   answer only from inside a user collective, after it finished its step, which needed every shadow
   step's operations posted. The last exchange, once every member has joined, is the caller thread's,
   after its shadow steps.
3. No cost for jobs that never join, and no operation posted ahead of time. The others find out from the
   signature exchange of their collective: when it has not completed within 50 ms they read the join
   counter of the set from the job's store (one request) and, when a member has joined, set a key that
   asks for an answer to that call (:func:`wake_joined`). The joined rank polls the store every 5 ms for
   the key of the next call number, or for every member having joined, and only then posts its answer
   (:func:`shoal.core.collectives.serve_joined`). A pending operation posted early would time out after
   ``timeout_s`` while the others were merely training; answering on request keeps every operation
   short-lived and keeps the groups' timeouts meaningful.
4. Nothing hangs. With no step owner to shadow, a joined rank that sees neither a call nor the others'
   ``join()`` for ``timeout_s`` raises StallError naming the ranks that have not joined; with owners,
   the shadow steps' own timeouts apply, and the answering thread stops with them.

This module owns the registry of live step owners per process set (the steps a joined rank shadows), the
rounds of shadow steps and the answering of user collectives. What lives elsewhere: the "joined" flag in
the per-step negotiation (:mod:`shoal.core.negotiation`), what a shadow step does
(:meth:`shoal.core.step.StepOwner.shadow_step`), the join signature and the zeros
(:mod:`shoal.core.collectives`, constraint 9).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import runtime
from .errors import ShoalError, StallError
from .stall import _store

__all__ = ["join", "register_owner", "note_step", "forget_world", "wake_joined"]

#: How often a joined rank looks at the store for a call to answer (constraint 3).
_SERVE_POLL_S = 0.005

#: Step owners per process-set ranks, in creation order, with the world they belong to (weak: an
#: optimizer that is gone drops out).
_registry: dict[tuple[int, ...], list[tuple[Any, "weakref.ref"]]] = {}
_join_calls: dict[tuple[int, ...], int] = {}
#: Orders every step of every owner in this process (which optimizers the training loop steps, below).
_sequence = itertools.count(1)
#: Per owner (by id): the sequence numbers of its last two steps.
_steps: dict[int, tuple[int, int]] = {}


def note_step(owner: Any) -> None:
    """Called by a step owner at every synchronization: remembers when it stepped."""
    _steps[id(owner)] = (_steps.get(id(owner), (0, 0))[1], next(_sequence))


def _in_the_loop(owners: list[Any]) -> list[Any]:
    """The owners of the training loop this rank just left: those that stepped since the previous step of
    the one it stepped last (a loop stepping A then B gives both; optimizers used earlier, in another
    loop, are left alone); all that ever stepped when the last one stepped once; all of them when none
    has."""
    stepped = [o for o in owners if id(o) in _steps and o.step > 0]
    if not stepped:
        return owners
    last = max(stepped, key=lambda o: _steps[id(o)][1])
    since = _steps[id(last)][0]
    return [o for o in stepped if _steps[id(o)][1] >= since] if since else stepped


def register_owner(owner: Any) -> None:
    """Called by every active step owner when it is created: :func:`join` shadows it."""
    _registry.setdefault(owner.process_set.ranks, []).append((runtime.world_token(), weakref.ref(owner)))


def forget_world() -> None:
    """The world is being left (elastic training): every live step owner drops what belongs to it
    (reducer, negotiator, their process groups), so that the old groups are destroyed now and their
    connections close: a peer still blocked in one of them then fails at once. The join call counts
    start over too: the next world's store keys live under its own prefix."""
    _join_calls.clear()
    for entries in _registry.values():
        for _tok, ref in entries:
            owner = ref()
            if owner is not None:
                owner.forget_world()
    _registry.clear()


def _alive(ps: runtime.ProcessSet) -> list[Any]:
    token = runtime.world_token()
    out = []
    for tok, ref in _registry.get(ps.ranks, []):
        owner = ref()
        if owner is not None and tok is token:
            out.append(owner)
    return out


def _round_key(ps: runtime.ProcessSet, calls: int) -> str:
    """The store key counting the members inside join call number ``calls`` on ``ps``."""
    return f"shoal/join/ps{ps.process_set_id}/{calls}"


def _call_key(ps: runtime.ProcessSet, calls: int, seq: int) -> str:
    """The store key that asks the joined members to answer user collective number ``seq``."""
    return f"{_round_key(ps, calls)}/call{seq}"


def wake_joined(ps: runtime.ProcessSet, seq: int) -> bool:
    """Called by a user collective whose signature exchange is slow (constraint 3): when a member of ``ps``
    is inside ``join()``, ask it to answer call number ``seq`` and return True; else False.

    One store request when nobody has joined; two when someone has."""
    store = _store()
    if store is None:
        return False
    calls = _join_calls.get(ps.ranks, 0)
    try:
        if int(store.add(_round_key(ps, calls), 0)) == 0:
            return False
        store.set(_call_key(ps, calls, seq), "1")
    except RuntimeError:  # the store is gone: the exchange itself will report the failure
        return False
    return True


def _answer_calls(ps: runtime.ProcessSet, calls: int, store: Any, stop: threading.Event,
                  deadline_s: Optional[float], last_round: bool = True) -> None:
    """Answer the other members' user collectives until every member has joined (constraints 2-4).

    ``last_round=False`` (the second thread, beside shadow steps): answer calls only; the last exchange,
    once every member has joined, is left to the caller's thread after its shadow steps, because those
    steps still use the set's group (tuning, checks) after every member has joined."""
    from . import collectives  # noqa: PLC0415 (collectives imports this module)

    n = ps.size()
    count_key = _round_key(ps, calls)
    last = time.monotonic()
    while not stop.is_set():
        seq = collectives.next_call_number(ps)
        asked = store.check([_call_key(ps, calls, seq)])
        if not asked and (not last_round or int(store.add(count_key, 0)) < n):
            if deadline_s is not None and time.monotonic() - last > deadline_s:
                waited = time.monotonic() - last
                raise StallError(rank=runtime.rank(), where="join()", waited_s=waited,
                                 waited_for="the other ranks' next collective or their join()",
                                 missing_text="they called neither (joined so far: "
                                 f"{int(store.add(count_key, 0))} of {n} ranks of process set "
                                 f"{list(ps.ranks)})")
            stop.wait(_SERVE_POLL_S)
            continue
        if collectives.serve_joined(ps):
            return
        last = time.monotonic()


def join(process_set: Optional[runtime.ProcessSet] = None) -> int:
    """This rank has finished its data: shadow the other ranks' optimizer steps with zero gradients until
    every rank has called ``join``; return the rank that joined last (Horovod's ``hvd.join()``).

    The step owners of the training loop this rank left are shadowed (those that stepped since the previous
    step of the optimizer it stepped last: a loop stepping two optimizers shadows both, an optimizer of an
    earlier loop none), in creation order, once per round: a step with zero gradients that contributes the
    "joined" flag to the others' negotiation. ``Average`` still divides by the full size of the process set, as Horovod does (its
    averaging is a postscale by ``1 / process_set size``), so a joined rank's zeros pull the average toward
    zero exactly as a rank with a zero gradient would.

    The other ranks' user collectives on the process set are answered too (constraint 2): zeros to an
    ``allreduce`` / ``grouped_allreduce`` (Sum, Average, Adasum), a ``barrier`` passes, and any other
    collective (allgather, broadcast, ...) raises ``MismatchError`` at once on the ranks that called it,
    naming the joined ranks (Horovod raises there too). This needs ``check_collectives`` (on by default)
    and gloo's control path; under NCCL such a collective waits for ``timeout_s`` and is then named as
    before. With no optimizer to shadow, a joined rank that sees no collective and no ``join()`` of the
    others for ``timeout_s`` raises ``StallError``.

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
    owners = _alive(ps)
    off = [o for o in owners if o.negotiator.mode == "off"]
    if off:
        raise ShoalError(f"shoal: join() needs the per-step negotiation, but a {off[0].what} on process set "
                         f"{list(ps.ranks)} has negotiation='off'. HINT: set SHOAL_NEGOTIATION=auto.")
    used = _in_the_loop(owners)
    calls = _join_calls.get(ps.ranks, 0)
    _join_calls[ps.ranks] = calls + 1
    order = 0
    store = _store()
    if store is not None:
        try:
            order = int(store.add(f"shoal/join/ps{ps.process_set_id}/{calls}", 1))
        except RuntimeError:
            order = 0
    stop = threading.Event()
    if store is not None and not used:  # constraint 2: nothing to shadow, answer in this thread
        _answer_calls(ps, calls, store, stop, deadline_s=runtime.config().timeout_s)
    answering: Optional[threading.Thread] = None
    failure: list[BaseException] = []
    if store is not None and used:
        def answer() -> None:
            try:
                _answer_calls(ps, calls, store, stop, deadline_s=None, last_round=False)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                failure.append(exc)

        answering = threading.Thread(target=answer, name="shoal-join-answer", daemon=True)
        answering.start()
    for o in used:
        o.negotiator.joined = True
    try:
        while used:
            every_rank_joined = True
            for o in used:
                o.shadow_step()
                every_rank_joined = every_rank_joined and o.negotiator.all_joined
            if every_rank_joined:
                break
    except BaseException:
        stop.set()
        raise
    finally:
        for o in used:
            o.negotiator.joined = False
            o.negotiator.all_joined = False
    if answering is not None:
        # Every member is inside join() now, so no call is left to answer (a member in a collective cannot
        # have joined): the thread stops, and this thread meets the others in the last exchange.
        stop.set()
        answering.join(timeout=runtime.config().timeout_s + 10.0)
        if answering.is_alive():
            raise StallError(rank=me, where="join()", waited_for="its answering thread to stop",
                             waited_s=runtime.config().timeout_s, missing_text="it is still in an exchange")
        if failure:
            raise failure[0]
        _answer_calls(ps, calls, store, threading.Event(), deadline_s=runtime.config().timeout_s)
    last = torch.tensor([(order << 32) | me], dtype=torch.int64)
    try:
        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=runtime.control_group(ps))
    except RuntimeError as exc:
        raise runtime.explain_failure(exc, "join", ps.ranks) from exc
    return int(last.item()) & 0xFFFFFFFF
