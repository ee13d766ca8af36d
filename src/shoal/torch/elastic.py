"""``hvd.elastic`` for PyTorch: Horovod's elastic API on Shoal's in-process recovery.

``TorchState(model, optimizer, **fields)`` says what survives a change of membership; ``run`` (the
engine's, :func:`shoal.core.elastic.run`) retries the training function; ``ElasticSampler`` hands out each
sample of an epoch once, also across changes of membership. A Horovod elastic script runs with the import
changed::

    import shoal.torch as hvd
    hvd.init()
    ...
    state = hvd.elastic.TorchState(model, optimizer, train_sampler=sampler, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for state.batch, (x, y) in enumerate(loader, start=state.batch): ...
                state.train_sampler.record_batch(state.batch, batch_size)
                if state.batch % 10 == 0:
                    state.commit()
            state.batch = 0

    train(state)

What lives elsewhere: the mechanism (:mod:`shoal.core.elastic`, :mod:`shoal.core.membership`), the launcher
(``shoal run --min-np/--max-np``, :mod:`shoal.runner.elastic`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Optional

import torch

from shoal.core import runtime
from shoal.core.elastic import ObjectState, State, generation, recovery_times, run
from shoal.core.errors import HorovodInternalError, HostsUpdatedInterrupt

from .broadcast_state import broadcast_optimizer_state, broadcast_parameters

__all__ = ["TorchState", "ElasticSampler", "State", "ObjectState", "run", "HorovodInternalError",
           "HostsUpdatedInterrupt", "generation", "recovery_times"]


class ElasticSampler(torch.utils.data.Sampler):
    """A sampler that hands out each sample of an epoch once across the job, also when workers come and go
    (Horovod's ``hvd.elastic.ElasticSampler``).

    Call :meth:`record_batch` after each batch's step. The samples not processed yet are dealt over the
    world (shuffled from ``seed + epoch``, the same on every rank); at a change of membership, what the
    previous world processed is worked out from rank 0's record alone (every rank steps in lockstep, so
    they recorded the same number of batches of their shares, the lost ranks too) and the rest is dealt
    again over the new world: no sample is skipped, none is processed twice in effect. Like torch's
    ``DistributedSampler``, the last samples of a pass are repeated when they do not divide evenly over the
    ranks (at most ``size - 1`` of them), so that every rank runs the same number of batches.

    Args:
        dataset: anything with ``len()``.
        shuffle: a new order every epoch (from ``seed + epoch``, the same on every rank).
        seed: the shuffle's seed.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.processed_indices: set[int] = set()
        self._base: set[int] = set()         # processed before the current dealing
        self._recorded = 0                   # batches of this rank's share recorded since it
        self._batch_size = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: nothing processed yet, a new order."""
        self.epoch = int(epoch)
        self.processed_indices = set()
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """This rank processed its batch ``batch_idx`` (of ``batch_size`` samples) of the current dealing."""
        self.record_indices(self.get_indices(batch_idx, batch_size))
        self._recorded = max(self._recorded, int(batch_idx) + 1)
        self._batch_size = int(batch_size)

    def record_indices(self, indices) -> None:
        self.processed_indices.update(int(i) for i in indices)

    def get_indices(self, batch_idx: int, batch_size: int) -> list[int]:
        start = batch_idx * batch_size
        return self.indices[start:min(start + batch_size, len(self.indices))]

    def state_dict(self) -> dict:
        """Plain data: the epoch, what was processed before the current dealing, and the dealing (world size,
        batches recorded, batch size), from which any rank works out what every rank of it processed."""
        return {"epoch": self.epoch, "base": sorted(self._base), "world": self.num_replicas,
                "recorded": self._recorded, "batch_size": self._batch_size}

    def load_state_dict(self, state: dict, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        """Take ``state`` (of any rank: see :meth:`state_dict`) and deal what is left over the current world
        (or over ``num_replicas`` ranks as ``rank``)."""
        self.epoch = int(state["epoch"])
        base = {int(i) for i in state["base"]}
        remaining = [i for i in range(len(self.dataset)) if i not in base]
        done = set(base)
        world, recorded, size = int(state["world"]), int(state["recorded"]), int(state["batch_size"])
        if recorded and size:
            order = self._order(remaining)
            total = int(math.ceil(len(order) / world)) * world
            padded = order + order[:total - len(order)] if order else order
            for r in range(world):
                done.update(padded[r:total:world][:recorded * size])
        self.processed_indices = done
        self.reset(num_replicas, rank)

    def reset(self, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        """Deal the samples not processed yet over the current world (after a change of membership), or over
        ``num_replicas`` ranks as ``rank`` when given (a sampler used outside a job, or a test)."""
        if num_replicas is None:
            num_replicas = runtime.size() if runtime.is_initialized() else 1
            rank = runtime.rank() if runtime.is_initialized() else 0
        self.num_replicas, self.rank = int(num_replicas), int(rank or 0)
        self._base = set(self.processed_indices)
        self._recorded = 0
        self.remaining_indices = [i for i in range(len(self.dataset)) if i not in self._base]
        self.num_samples = int(math.ceil(len(self.remaining_indices) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.indices = self._mine()

    def _order(self, indices: list[int]) -> list[int]:
        if not self.shuffle:
            return list(indices)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]

    def _mine(self) -> list[int]:
        indices = self._order(self.remaining_indices)
        if indices:
            indices += indices[:self.total_size - len(indices)]  # the tail repeated: equal batch counts
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        self.indices = self._mine()
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def _copy_into(saved: Any, live: Any) -> Any:
    """A copy of ``live`` (a state dict: dicts, lists, tensors, plain values) that reuses the tensors of
    ``saved`` (an earlier copy) where shape, dtype and device match."""
    if isinstance(live, torch.Tensor):
        if (isinstance(saved, torch.Tensor) and saved.shape == live.shape and saved.dtype == live.dtype
                and saved.device == live.device):
            return saved.copy_(live.detach())
        return live.detach().clone()
    if isinstance(live, dict):
        old = saved if isinstance(saved, dict) else {}
        return {k: _copy_into(old.get(k), v) for k, v in live.items()}
    if type(live) in (list, tuple):
        old = saved if type(saved) is type(live) and len(saved) == len(live) else [None] * len(live)
        return type(live)(_copy_into(o, v) for o, v in zip(old, live))
    return copy.deepcopy(live)


class TorchState(ObjectState):
    """The model's and optimizer's state plus plain fields (Horovod's ``hvd.elastic.TorchState``).

    Saved in memory at ``commit()`` (deep copies of ``state_dict()``), restored after a failure when the
    survivors had not all finished the same step, copied from rank 0 at every change of membership
    (``broadcast_parameters``, ``broadcast_optimizer_state``: no pickle). An :class:`ElasticSampler` among
    the fields takes rank 0's record at sync and deals what is left over the new world.

    Args:
        model: a ``torch.nn.Module`` (or None).
        optimizer: a ``torch.optim.Optimizer`` or Shoal's ``DistributedOptimizer`` (or None).
        **kwargs: other fields (``epoch=0``, ``batch=0``, a sampler, ...).
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 **kwargs: Any):
        samplers = {k: v for k, v in kwargs.items() if isinstance(v, ElasticSampler)}
        plain = {k: v for k, v in kwargs.items() if k not in samplers}
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "_samplers", samplers)
        for name, sampler in samplers.items():
            object.__setattr__(self, name, sampler)
        super().__init__(**plain)
        self._saved_model = None
        self._saved_optimizer = None
        self._saved_samplers: dict[str, dict] = {}
        self.save()

    def save(self) -> None:
        # Into the previous commit's tensors, where shapes match: a commit then allocates nothing (for a
        # model of 100 MB, deepcopy's fresh pages cost more than the copy itself).
        if self.model is not None:
            self._saved_model = _copy_into(self._saved_model, self.model.state_dict())
        if self.optimizer is not None:
            self._saved_optimizer = _copy_into(self._saved_optimizer, self.optimizer.state_dict())
        self._saved_samplers = {k: s.state_dict() for k, s in self._samplers.items()}
        super().save()

    def restore(self) -> None:
        if self.model is not None and self._saved_model is not None:
            self.model.load_state_dict(self._saved_model)
        if self.optimizer is not None and self._saved_optimizer is not None:
            self.optimizer.load_state_dict(self._saved_optimizer)
        for name, saved in self._saved_samplers.items():
            self._samplers[name].load_state_dict(saved)
        super().restore()

    def on_reset(self) -> None:
        # Deal what is left of the epoch over the new world, from this rank's own record: a change of
        # membership without a sync (only leavers: every rank holds the same state) would otherwise start
        # the old dealing over (measured: 23% more samples in an epoch with a SIGTERM). Every survivor
        # finished the same batches of the dealing, so the record is the same on each; sync() then takes
        # rank 0's anyway.
        for sampler in self._samplers.values():
            sampler.load_state_dict(sampler.state_dict())
        super().on_reset()

    def sync(self) -> None:
        if runtime.size() > 1:
            if self.model is not None:
                broadcast_parameters(self.model.state_dict(), root_rank=0)
            if self.optimizer is not None:
                broadcast_optimizer_state(self.optimizer, root_rank=0)
            from shoal.core.collectives import broadcast_object  # noqa: PLC0415

            for name, sampler in self._samplers.items():
                # Rank 0's record says what the whole previous world processed (ElasticSampler).
                sampler.load_state_dict(broadcast_object(sampler.state_dict(), root_rank=0,
                                                         name=f"elastic.{name}", trusted=False))
        else:
            for sampler in self._samplers.values():
                sampler.reset()
        super().sync()
