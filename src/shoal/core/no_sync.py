"""Which parameters a data-parallel step must leave alone: the ``_shoal_no_sync`` mark and its registry.

Owns the mark (``NO_SYNC_ATTR``), the registry of marked parameters and the lookup that also recognizes
them through detached copies. Who reads it: Shoal's DistributedOptimizer (skips marked parameters),
``broadcast_parameters`` / ``broadcast_optimizer_state`` (skip them and their optimizer state), DDP through
:func:`shoal.parallel.exclude_from_ddp`.

Design constraints:

1. ``model.state_dict()`` hands out ``param.detach()``: a new tensor object without the attribute, sharing
   the parameter's storage. So marked parameters are also recorded in a registry and matched through their
   storage (data pointer, offset, shape), computed when asked, not when marked: ``module.to(...)`` and
   ``param.data = ...`` move a parameter to new storage without changing the object.
2. The registry must not keep a module alive: it holds weak references, keyed by ``id`` (a tensor's ``==``
   is elementwise, so tensors cannot be set members themselves).
3. A view of a marked parameter that covers only part of it (a slice) is not the parameter: the key has
   the offset and the shape, so a flat buffer holding several parameters never matches all of them.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch

__all__ = ["NO_SYNC_ATTR", "mark_no_sync", "is_no_sync", "no_sync_matcher"]

#: Attribute set to True on parameters that a data-parallel reduction or broadcast must skip.
NO_SYNC_ATTR = "_shoal_no_sync"

_registry: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def mark_no_sync(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param`` as different on every rank by design (a shard): never averaged, never broadcast.

    PartialFC marks its weight; call it for parameters of your own model-parallel layers.

    Returns:
        ``param``.

    Example:
        >>> expert = nn.Parameter(torch.randn(local_experts, d, d))
        >>> shoal.parallel.mark_no_sync(expert)
    """
    setattr(param, NO_SYNC_ATTR, True)
    _registry[id(param)] = param
    return param


def _storage_key(t: torch.Tensor) -> Optional[tuple]:
    if t.is_meta or t.layout != torch.strided:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (e.g. some subclasses)
        return None
    if ptr == 0:  # empty or unallocated: no identity to compare
        return None
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape))


def no_sync_matcher(extra: Iterable[torch.Tensor] = ()):
    """A predicate ``tensor -> bool``: is ``tensor`` a marked parameter, itself or a detached copy of it?

    The registry's storage keys are computed once, when the matcher is built: build one per broadcast.
    ``extra`` adds tensors to treat as marked.
    """
    keys = {k for p in [*list(_registry.values()), *extra] if (k := _storage_key(p)) is not None}

    def matches(t: torch.Tensor) -> bool:
        if getattr(t, NO_SYNC_ATTR, False):
            return True
        key = _storage_key(t)
        return key is not None and key in keys

    return matches


def is_no_sync(t: torch.Tensor) -> bool:
    """True for a marked parameter or a tensor sharing its storage exactly (``state_dict()`` entries).

    Example:
        >>> [k for k, v in model.state_dict().items() if shoal.parallel.is_no_sync(v)]
        ['head.weight']
    """
    return no_sync_matcher()(t)
