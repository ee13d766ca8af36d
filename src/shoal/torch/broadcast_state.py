"""``broadcast_parameters`` and ``broadcast_optimizer_state``: Horovod's start-of-training copies from one
rank to all, checked first so that a model or optimizer built differently on one rank is a named error.

Design constraints:

1. Check before moving. torch.distributed trusts the caller's sizes, so a model built differently on one
   rank would broadcast into the wrong tensors, or fail inside gloo with a size error that names neither
   the tensor nor the rank. The ranks first compare what they pass (names, shapes, dtypes, devices; for an
   optimizer also its class and its parameter groups) with the registration check
   (:func:`shoal.core.registration.check_registration`: one 16-byte allreduce; the lists travel only on a
   mismatch). Skipped with ``check_collectives`` off, like every other check of the collectives.
2. Nothing a peer sends is unpickled: an optimizer's state travels in the object collectives' restricted
   mode (``trusted=False``, :mod:`shoal.core.plain`: a JSON skeleton plus the tensors' bytes).
3. Parameters marked no-sync (a class-sharded classifier's weight, :mod:`shoal.core.no_sync`) are never
   broadcast, nor their optimizer state: every rank keeps its own shard.

What lives elsewhere: the optimizer wrapper (:mod:`shoal.torch.optimizer`), the tensor collectives
(:mod:`shoal.core.collectives`).
"""

from __future__ import annotations

from typing import Optional

import torch

from shoal.core import collectives, runtime
from shoal.core.errors import MismatchError
from shoal.core.no_sync import no_sync_matcher
from shoal.core.registration import check_registration

__all__ = ["broadcast_parameters", "broadcast_optimizer_state"]


def _check_same(what: str, entries: list[tuple], ps: runtime.ProcessSet,
                settings: Optional[dict] = None) -> None:
    """Raise the same MismatchError on every rank unless every rank passes the same ``entries`` and
    ``settings`` (constraint 1). ``entries`` are ``(name, shape, description)``: the description stands
    where the registration check expects the dtype (dtype, device, group; or "sharded")."""
    if ps.size() == 1 or not runtime.config().check_collectives:
        return
    try:
        check_registration(entries, ps, what=what, settings=settings)
    except MismatchError as exc:
        # The same text on every rank (check_registration's is), plus what only a broadcast needs to say.
        raise MismatchError(
            f"{exc} A parameter that is sharded on purpose (different on every rank) must carry the no-sync "
            "mark on every rank (shoal.parallel.mark_no_sync(param); PartialFC marks its weight itself); "
            "broadcasts then skip it.") from None


def _describe(t: torch.Tensor) -> str:
    """What :func:`_check_same` compares besides the shape (messages print it before the shape)."""
    return f"{str(t.dtype).replace('torch.', '')} on {t.device.type}"


def _named_tensors(params, what: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a ``state_dict()``, ``named_parameters()``, or a plain list of tensors
    (Horovod accepts ``list(model.parameters())``; its entries are then named by position)."""
    if hasattr(params, "items"):
        return [(str(k), v) for k, v in params.items()]
    items = list(params)
    if all(isinstance(t, torch.Tensor) for t in items):
        return [(f"{what}[{i}]", t) for i, t in enumerate(items)]
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"shoal: {what}() takes a state_dict(), named_parameters() or a list of tensors; "
                            f"entry {i} is a {type(item).__name__}. HINT: pass model.state_dict().")
        out.append((str(item[0]), item[1]))
    return out


def broadcast_parameters(params, root_rank: int = 0,
                         process_set: Optional[runtime.ProcessSet] = None) -> None:
    """Copy parameters (a ``state_dict()``, ``named_parameters()`` or a list of tensors) from ``root_rank``
    to every rank, in place, one collective per dtype.

    Parameters marked no-sync (a class-sharded classifier's weight, :mod:`shoal.parallel`) are skipped,
    also when given as the detached copies of ``state_dict()``: every rank keeps its own shard. Before any
    data moves, the ranks check in one 16-byte allreduce that they pass the same names, dtypes and shapes
    (sharded parameters: the same names); a difference raises :class:`~shoal.core.errors.MismatchError` on
    every rank, naming every differing tensor (up to 8) and what each rank holds.

    Raises:
        MismatchError: the ranks' tensors differ (name, dtype, shape or device).

    Example:
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    ps = runtime.get_process_set(process_set, "broadcast_parameters")
    no_sync = no_sync_matcher()
    entries, tensors = [], []
    for name, t in _named_tensors(params, "broadcast_parameters"):
        if not isinstance(t, torch.Tensor):
            continue
        if no_sync(t):
            entries.append((name, (), "sharded (not broadcast)"))
        else:
            entries.append((name, tuple(t.shape), _describe(t)))
            tensors.append(t)
    _check_same("broadcast_parameters", entries, ps)
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in by_dtype.items():
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            collectives.broadcast_(flat, root_rank, name=f"broadcast_parameters.{dtype}.{device.type}",
                                   process_set=ps)
            off = 0
            for t in ts:
                t.detach().copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0,
                              process_set: Optional[runtime.ProcessSet] = None) -> None:
    """Copy the optimizer's state (and hyper-parameters) from ``root_rank`` to every rank.

    The state of parameters marked no-sync (a sharded classifier's momentum, Adam moments and step) stays
    each rank's own and is not sent: a shard's state belongs to that shard (with uneven shards it does not
    even have the same shape). Before the state moves, the ranks check in one 16-byte allreduce that their
    optimizers are of the same class and hold the same parameters (groups, dtypes, shapes): loading an
    Adam's state into an SGD would fail a step later on that rank alone (``KeyError: 'momentum'``).

    Raises:
        MismatchError: the ranks' optimizers differ (class, parameters), on every rank.

    Example:
        >>> hvd.broadcast_optimizer_state(opt, root_rank=0)
    """
    from shoal.torch.optimizer import DistributedOptimizer  # noqa: PLC0415 (it imports this module)

    ps = runtime.get_process_set(process_set, "broadcast_optimizer_state")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"shoal: broadcast_optimizer_state() needs a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}. HINT: pass the optimizer (or DistributedOptimizer).")
    wrapped = optimizer if isinstance(optimizer, DistributedOptimizer) else None
    inner = wrapped.optimizer if wrapped is not None else optimizer
    named = {id(p): n for n, p in wrapped.named_parameters()} if wrapped is not None else {}
    no_sync = no_sync_matcher()
    params = [p for g in inner.param_groups for p in g["params"]]
    # state_dict() numbers the parameters 0, 1, ... across the groups in this order.
    local = {i for i, p in enumerate(params) if no_sync(p)}
    entries = []
    i = 0
    for gi, group in enumerate(inner.param_groups):
        for p in group["params"]:
            label = f"{named[id(p)]} (optimizer parameter {i})" if id(p) in named else f"optimizer parameter {i}"
            if i in local:
                entries.append((label, (), f"group {gi}, sharded (state kept)"))
            else:
                entries.append((label, tuple(p.shape), f"group {gi}, {_describe(p)}"))
            i += 1
    kind = f"{type(inner).__module__}.{type(inner).__qualname__}"
    _check_same("broadcast_optimizer_state", entries, ps, settings={"optimizer class": kind})
    sent = None
    if runtime.rank() == root_rank:
        sd = inner.state_dict()
        sent = {"state": {k: v for k, v in sd["state"].items() if k not in local},
                "param_groups": sd["param_groups"]}
    received = collectives.broadcast_object(sent, root_rank, name="broadcast_optimizer_state", process_set=ps,
                                            trusted=False)
    if runtime.rank() == root_rank:
        return
    kept = {i: inner.state[params[i]] for i in local if params[i] in inner.state}
    inner.load_state_dict(received)
    for i in local:
        inner.state.pop(params[i], None)
        if i in kept:
            inner.state[params[i]] = kept[i]
