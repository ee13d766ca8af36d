"""Join (uneven inputs): a rank out of data shadows the other ranks' steps with zeros until every rank has
joined, with Horovod's semantics. One mechanism for every frontend (``shoal.torch.join``,
``shoal.keras.join``).

This module owns the registry of live step owners per process set (the steps a joined rank shadows) and
the rounds of shadow steps. What lives elsewhere: the "joined" flag in the per-step negotiation
(:mod:`shoal.core.negotiation`), what a shadow step does (:meth:`shoal.core.step.StepOwner.shadow_step`).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import runtime
from .errors import ShoalError
from .stall import _store

__all__ = ["join", "register_owner", "note_step", "forget_world"]

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
    connections close: a peer still blocked in one of them then fails at once."""
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


def join(process_set: Optional[runtime.ProcessSet] = None) -> int:
    """This rank has finished its data: shadow the other ranks' optimizer steps with zero gradients until
    every rank has called ``join``; return the rank that joined last (Horovod's ``hvd.join()``).

    The step owners of the training loop this rank left are shadowed (those that stepped since the previous
    step of the optimizer it stepped last: a loop stepping two optimizers shadows both, an optimizer of an
    earlier loop none), in creation order, once per round: a step with zero gradients that contributes the
    "joined" flag to the others' negotiation. ``Average`` still divides by the full size of the process set, as Horovod does (its
    averaging is a postscale by ``1 / process_set size``), so a joined rank's zeros pull the average toward
    zero exactly as a rank with a zero gradient would.

    Only the optimizers' gradient reductions are shadowed: a user collective that the other ranks call
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
    finally:
        for o in used:
            o.negotiator.joined = False
            o.negotiator.all_joined = False
    last = torch.tensor([(order << 32) | me], dtype=torch.int64)
    try:
        dist.all_reduce(last, op=dist.ReduceOp.MAX, group=runtime.control_group(ps))
    except RuntimeError as exc:
        raise runtime.explain_failure(exc, "join", ps.ranks) from exc
    return int(last.item()) & 0xFFFFFFFF
