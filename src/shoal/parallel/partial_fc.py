"""PartialFC: a margin-softmax classifier whose weight is sharded by class across ranks (InsightFace-type
model parallelism), with optional negative-class sampling (Partial FC).

Owns the module, its class sharding, the sampling of classes, the lazy (sampled-rows-only) optimizer update
and the sharded checkpoint format. The collectives are in :mod:`shoal.parallel._ops`; the margins in
:mod:`shoal.parallel.margins`.

Glossary:
    shard: the contiguous class range ``[class_start, class_end)`` this rank owns; sizes differ by at most 1.
    global batch: every rank's local batch, concatenated in rank order (equal local sizes required).
    sampled classes: with ``sample_rate < 1``, the classes of this shard that take part in a step: all
        classes present in the global batch, plus uniformly drawn others up to ``sample_rate`` of the shard.

Design constraints:

1. The loss is the full softmax cross-entropy (with margin) of the global batch, identical on every rank,
   and the gradients equal those of a single process that holds the whole weight: the weight gradient is
   the gradient of that loss (never averaged: each rank owns different rows), and the embedding gradient
   is ``size`` times the gradient of that loss, i.e. the gradient of the mean over the rank's own samples,
   which is what a data-parallel backbone expects: averaging over ``size`` ranks gives the exact gradient.
2. Sharded parameters must never be averaged nor broadcast across ranks. Every parameter carries
   ``_shoal_no_sync = True`` and is registered (:mod:`shoal.core.no_sync`, which also recognizes the
   detached copies of ``state_dict()``); Shoal's DistributedOptimizer, ``broadcast_parameters`` and
   ``broadcast_optimizer_state`` skip such parameters; a forward inside a DDP module that has not excluded
   them raises (DDP would broadcast rank 0's shard over the others' and average the shards).
3. Equal local batch sizes on every rank (the all-gather needs them); checked every step with one
   all-gather of one integer, raising an error that names every rank's size instead of hanging.
4. Sampling keeps the optimizer honest: with :meth:`PartialFC.bind_optimizer`, a step updates only the rows
   used since the previous step, and their per-element state (momentum, Adam moments); unused rows and
   their state stay bit-identical (a "lazy" update, as SparseAdam does).
5. Checkpoints are per-rank shard files plus a JSON index of the class ranges, loadable into any world size:
   each rank reads only the slices that overlap its new range (memory-mapped).
6. A checkpoint is one save, never a mix. A save interrupted by a dying rank used to leave shards of two
   saves under the same names, and loading took the mix without a word. Now every save has an id (rank 0's
   random 63 bits) in its shard file names, in each shard and in the index; shards are written and fsynced
   first, then, once every rank has reported its shard on disk, rank 0 renames the index into place (temp
   file, fsync, ``os.replace``, directory fsync: :mod:`shoal.core.files`). That rename is the single commit
   point: before it the previous index still names the previous save's shards, which nothing has touched;
   after it the new one names the new shards. Loading checks every shard's save id, class range and size
   against the index and names the shard, the rank that wrote it and both saves when they differ. Files
   of other saves are removed only after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.core.errors import ShoalError
from shoal.core.files import atomic_write

from ._ops import _AllGatherEmbeddings, _all_gather_rows, _normalize_rows, _resolve_shards, _Shards, \
    _ShardedSoftmaxCrossEntropy
from .margins import MarginLoss
from shoal.core.no_sync import NO_SYNC_ATTR, mark_no_sync

__all__ = [
    "PartialFC",
    "shard_range",
    "exclude_from_ddp",
    "load_full_weight",
    "NO_SYNC_ATTR",
]

log = logging.getLogger(__name__)

_FORMAT = "shoal.partial_fc/2"
#: Format 1 (no save id, shards overwritten in place) still loads, with a warning.
_FORMAT_1 = "shoal.partial_fc/1"
_INDEX_FILE = "partial_fc.json"
#: Where ``state_dict()`` keeps the shard layout: its metadata, next to torch's ``version``.
_LAYOUT_KEY = "shoal_partial_fc"
#: ``partial_fc.<save id>.shardRRRRR-of-NNNNN.pt``, its temporary files (``.<name>.<random>.tmp``, see
#: :mod:`shoal.core.files`) and format 1's ``partial_fc.shardRRRRR-of-NNNNN.pt``.
_SHARD_RE = re.compile(r"^(?P<tmp>\.)?partial_fc\.(?:(?P<save>[0-9a-f]{16})\.)?"
                       r"shard(?P<shard>\d{5})-of-(?P<of>\d{5})\.pt(?(tmp)\.[0-9a-f]+\.tmp)$")
_INDEX_TMP_RE = re.compile(r"^\.partial_fc\.json\.[0-9a-f]+\.tmp$")
# Rows are initialized in blocks with a seed per block, so that the full weight is the same whatever the
# number of ranks (a run on 2 ranks starts where a run on 3 would) without any rank materializing it.
_INIT_BLOCK_ROWS = 4096


def shard_range(num_classes: int, size: int, rank: int) -> tuple[int, int]:
    """Class range ``[start, end)`` of ``rank`` among ``size`` balanced contiguous shards.

    The first ``num_classes % size`` ranks get one class more.

    Example:
        >>> [shard_range(10, 3, r) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(num_classes, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def exclude_from_ddp(module: nn.Module) -> list[str]:
    """Make ``DistributedDataParallel(module)`` leave every sharded parameter alone.

    Call it before wrapping a model that contains a :class:`PartialFC`. It records the names of all
    parameters marked ``_shoal_no_sync`` in the attribute DDP reads at construction, so DDP neither
    broadcasts nor averages them. Keeping PartialFC outside the DDP module is the simpler alternative.

    Returns:
        The excluded parameter names.
    """
    names = [n for n, p in module.named_parameters() if getattr(p, NO_SYNC_ATTR, False)]
    previous = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = sorted(set(previous) | set(names))
    return names


def _init_rows(start: int, end: int, dim: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Rows ``start..end`` of an N(0, 0.01^2) matrix whose values depend on the row, not on the sharding."""
    out = torch.empty((end - start, dim), dtype=dtype)
    gen = torch.Generator()
    block = start // _INIT_BLOCK_ROWS
    while block * _INIT_BLOCK_ROWS < end:
        lo, hi = block * _INIT_BLOCK_ROWS, (block + 1) * _INIT_BLOCK_ROWS
        gen.manual_seed(seed * 1_000_003 + block)
        values = torch.randn((_INIT_BLOCK_ROWS, dim), generator=gen, dtype=torch.float32) * 0.01
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = values[a - lo:b - lo].to(dtype)
        block += 1
    return out


def _sampling_seed(seed: int, rank: int) -> int:
    """Seed of a rank's class sampler, apart from every weight-init block seed (``seed * 1_000_003 + block``).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed (``manual_seed(1 << 40)`` draws what
    ``manual_seed(0)`` draws), so offsets cannot separate streams; the former ``seed * 1_000_003 + 7919 *
    rank + 1`` was block 1's init seed on rank 0. A hash of (seed, rank) lands on an init seed with
    probability ~blocks / 2**32.
    """
    digest = hashlib.blake2b(f"shoal.partial_fc.sample/{seed}/{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _check_row_state(state: dict, weight: Tensor, rank: int, where: str) -> None:
    """Refuse optimizer state of the sharded weight that is neither per row (the weight's shape) nor scalar.

    Such state cannot be restricted to the sampled rows nor re-sharded; left alone it fails later inside
    the optimizer with a size error that names neither the tensor nor the cause, or (in a checkpoint) would
    be copied whole onto every rank.
    """
    for k, v in state.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape != weight.shape:
            raise ShoalError(
                f"shoal: PartialFC {where} on rank {rank}: the optimizer state '{k}' of the sharded weight has "
                f"shape {list(v.shape)}, but this rank's shard of the weight is {list(weight.shape)}. PartialFC "
                "handles state shaped like the weight (momentum, Adam's moments) and scalars (Adam's step). "
                "HINT: after opt.load_state_dict() of a checkpoint saved by another rank or another number of "
                "ranks, call pfc.load_sharded(directory, optimizer=opt), which replaces the weight's state "
                "with its re-sharded rows; optimizers with factored state (e.g. Adafactor) are not supported "
                "for the sharded weight (give it its own SGD/Adam).")


class _LazyRowsUpdate:
    """Optimizer step hooks: step only the rows used since the last step (constraint 4).

    Before the step the weight, its gradient and every per-element state tensor are swapped for their used
    rows; after it the rows are written back. Nested step calls (an optimizer subclass whose ``step`` calls
    ``super().step()`` fires the hooks at both levels) swap once, at the outermost level.

    A step that never runs (``nan_check="skip"``, a GradScaler step skipped for inf) fires no hook, so the
    rows used are also forgotten when the gradient they belong to is gone: ``after_backward`` records the
    gradient (object and version counter) that the last backward left, and a forward that finds another
    one (``zero_grad()`` set it to None, or zeroed it in place) starts a new set of rows.
    """

    def __init__(self, owner: "PartialFC"):
        self.owner = owner
        self.depth = 0
        self.swapped: Optional[tuple] = None
        self.grad_seen: Optional[tuple[int, int]] = None

    def after_backward(self, param: Tensor) -> None:
        grad = param.grad
        self.grad_seen = None if grad is None else (id(grad), grad._version)

    def rows_pending(self) -> bool:
        """Is the gradient the rows used so far were accumulated into still there, unchanged?"""
        grad = self.owner.weight.grad
        return grad is not None and self.grad_seen == (id(grad), grad._version)

    def before_step(self, optimizer, args, kwargs) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        w = self.owner.weight
        used = self.owner._rows_used
        self.swapped = None
        if used is None or w.grad is None or bool(used.all()):
            return
        index = torch.nonzero(used).squeeze(1)
        state = optimizer.state.get(w, {})
        _check_row_state(state, w, dist.get_rank() if dist.is_initialized() else 0, "optimizer step")
        full_state = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == w.shape}
        for k, v in full_state.items():
            state[k] = v.index_select(0, index)
        self.swapped = (w.data, w.grad, full_state, index)
        w.data = w.data.index_select(0, index)
        w.grad = self.swapped[1].index_select(0, index)

    def after_step(self, optimizer, args, kwargs) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        self.owner._rows_used = None
        if self.swapped is None:
            return
        w = self.owner.weight
        full_data, full_grad, full_state, index = self.swapped
        self.swapped = None
        full_data.index_copy_(0, index, w.data)
        small_shape = w.data.shape
        w.data, w.grad = full_data, full_grad
        state = optimizer.state.get(w)
        if not state:
            return
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.shape == small_shape:
                # State created by this very step (first step) starts at zero on the unused rows, as a
                # dense step with zero gradients there would have left it.
                full = full_state.get(k)
                if full is None:
                    full = v.new_zeros(full_data.shape)
                full.index_copy_(0, index, v)
                state[k] = full


def _stepping_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` runs torch's step hooks: ``optimizer`` or the one it wraps.

    torch runs step hooks only for classes whose ``Optimizer.__init__`` patched ``step``. A wrapper that
    shares its inner optimizer's state without calling it (Shoal's DistributedOptimizer; Lightning and
    accelerate wrappers) would accept hooks and never run them: sampled rows would silently be stepped
    densely. Known wrapper attributes are followed; anything else is refused.
    """
    seen = optimizer
    for _ in range(4):
        if getattr(type(seen).step, "hooked", False):
            return seen
        inner = next((getattr(seen, a) for a in ("optimizer", "_inner", "_optimizer")
                      if isinstance(getattr(seen, a, None), torch.optim.Optimizer)), None)
        if inner is None:
            break
        seen = inner
    raise ValueError(f"shoal: PartialFC.bind_optimizer: {type(optimizer).__name__}.step does not run torch's "
                     "optimizer step hooks, and no wrapped optimizer was found. HINT: bind the optimizer it "
                     "wraps (the torch.optim optimizer you created).")


class _Binding:
    """Handle returned by :meth:`PartialFC.bind_optimizer`; ``remove()`` unbinds."""

    def __init__(self, owner: "PartialFC", handles: tuple):
        self._owner, self._handles = owner, handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._owner._lazy = None
        self._owner._rows_used = None


class PartialFC(nn.Module):
    """Margin-softmax classifier sharded by class across the ranks of a process set.

    Each rank holds rows ``[class_start, class_end)`` of the ``(num_classes, embedding_size)`` weight.
    ``forward(embeddings, labels)`` takes this rank's local batch and returns the global-batch loss.

    Also takes insightface's argument order, ``PartialFC(margin_loss, embedding_size, num_classes,
    sample_rate, fp16)`` (``PartialFC_V2`` in arcface_torch's ``train_v2.py``), recognized by the margin
    coming first, and insightface's margin modules (see ``margin_loss``).

    Args:
        embedding_size: dimension of the embeddings.
        num_classes: total number of classes (identities), over all ranks; at least the number of ranks.
        margin_loss: a :class:`~shoal.parallel.MarginLoss` (ArcFace, CosFace, CombinedMargin), or another
            module in insightface's shape ``(logits, labels) -> logits``: cosines clamped to [-1, 1] and
            labels of shape ``(rows, 1)``, -1 where the target is on another shard (e.g. arcface_torch's
            ``CombinedMarginLoss``, which may modify the logits in place; it gets a copy).
        sample_rate: fraction of each shard's classes used per training step (1.0: all). Classes present in
            the global batch are always used. Call :meth:`bind_optimizer` so that only used rows are stepped.
        process_set: the ranks sharing the classifier (default: all). Every member must call ``forward``.
        fp16: compute the logits matmul in half precision (float16 on CUDA, bfloat16 on CPU, via autocast);
            the margin, softmax and loss stay in the weight's dtype.
        seed: seeds the weight initialization (independent of the world size) and the class sampling.
        device, dtype: of the weight (default: the device collectives use, the rank's GPU under NCCL; float32).

    Raises:
        ValueError: invalid sizes or rates, or this rank is not in ``process_set``.

    Example:
        >>> pfc = PartialFC(512, 1_000_000, ArcFace(s=64.0, m=0.5), sample_rate=0.1)
        >>> opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": pfc.parameters()}], lr=0.1,
        ...                       momentum=0.9)
        >>> pfc.bind_optimizer(opt)
        >>> loss = pfc(backbone(images), labels); loss.backward(); opt.step()
    """

    def __init__(self, embedding_size: int, num_classes: int, margin_loss: nn.Module, sample_rate: float = 1.0,
                 process_set=None, fp16: bool = False, seed: int = 0,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if callable(embedding_size) and not isinstance(embedding_size, int):
            # insightface's order: (margin_loss, embedding_size, num_classes, sample_rate, fp16); its fifth
            # positional argument lands in process_set.
            embedding_size, num_classes, margin_loss = num_classes, margin_loss, embedding_size
            if isinstance(process_set, bool):
                fp16, process_set = process_set, None
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or \
                isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"shoal: PartialFC(embedding_size={embedding_size!r}, num_classes={num_classes!r}): "
                            "both must be ints. HINT: PartialFC(embedding_size, num_classes, margin_loss, ...) or "
                            "insightface's PartialFC(margin_loss, embedding_size, num_classes, sample_rate, fp16).")
        if not callable(margin_loss):
            raise TypeError(f"shoal: PartialFC margin_loss={margin_loss!r} is not a module. HINT: pass "
                            "shoal.parallel.ArcFace(...), CosFace(...), CombinedMargin(...) or insightface's "
                            "CombinedMarginLoss(...).")
        if embedding_size < 1:
            raise ValueError(f"shoal: PartialFC embedding_size must be >= 1, got {embedding_size}.")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"shoal: PartialFC sample_rate must be in (0, 1], got {sample_rate}. "
                             "HINT: 0.1 keeps 10% of the negative classes per step.")
        self._shards: _Shards = _resolve_shards(process_set)
        if num_classes < self._shards.size:
            raise ValueError(f"shoal: PartialFC needs at least one class per rank: {num_classes} classes on "
                             f"{self._shards.size} ranks. HINT: use fewer ranks for the classifier "
                             "(process_set=...).")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin_loss = margin_loss
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.seed = int(seed)
        self.class_start, self.class_end = shard_range(num_classes, self._shards.size, self._shards.rank)
        self.num_local = self.class_end - self.class_start
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        device = self._shards.device if device is None else device
        dtype = dtype or torch.float32
        rows = _init_rows(self.class_start, self.class_end, self.embedding_size, self.seed, dtype)
        self.weight = nn.Parameter(rows.to(device))
        # The mark and the registry: broadcast_parameters(model.state_dict()) sees only detached copies.
        mark_no_sync(self.weight)
        #: Global class ids this rank used in the last training step (None without sampling).
        self.last_sampled_classes: Optional[Tensor] = None
        self._rows_used: Optional[Tensor] = None
        self._generator: Optional[torch.Generator] = None
        self._lazy: Optional[_LazyRowsUpdate] = None
        self._warned_unbound = False
        log.debug("shoal: PartialFC rank %d/%d owns classes [%d, %d) of %d", self.rank, self.world_size,
                  self.class_start, self.class_end, self.num_classes)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def rank(self) -> int:
        """This rank's index among the classifier's ranks."""
        return self._shards.rank

    @property
    def world_size(self) -> int:
        """Number of ranks sharing the classifier."""
        return self._shards.size

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.class_start}, {self.class_end}) of rank {self.rank}/{self.world_size}, "
                f"sample_rate={self.sample_rate:g}, fp16={self.fp16}")

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Global-batch margin-softmax cross-entropy; a collective over the classifier's ranks.

        Args:
            embeddings: ``(batch, embedding_size)`` this rank's embeddings (the same batch on every rank).
            labels: ``(batch,)`` or ``(batch, 1)`` (insightface's loaders) integer class ids in
                ``[0, num_classes)``; never modified (insightface squeezes them in place).

        Returns:
            The scalar mean loss over the global batch, identical on every rank.

        Raises:
            ShoalError: local batch sizes differ across ranks, a label is out of range, or the module runs
                inside a DDP module that did not exclude its weight.
        """
        self._check_not_in_ddp()
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"shoal: PartialFC embeddings on rank {self.rank} have shape "
                             f"{tuple(embeddings.shape)}, expected (batch, {self.embedding_size}).")
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"shoal: PartialFC labels on rank {self.rank} have shape {tuple(labels.shape)}, "
                             f"expected ({embeddings.shape[0]},) or ({embeddings.shape[0]}, 1) to match the "
                             "embeddings.")
        self._check_batch_sizes(embeddings.shape[0])
        w = self.weight
        # Normalize before the gather: same result as after, with 1/size of the work on each rank.
        local = F.normalize(embeddings.to(w.dtype), dim=1)
        gathered = _AllGatherEmbeddings.apply(local, self._shards, float(self._shards.size))
        all_labels = _all_gather_rows(labels.to(device=w.device, dtype=torch.long).reshape(-1), self._shards)
        self._check_labels(all_labels)
        shifted = all_labels - self.class_start
        targets = torch.where((shifted >= 0) & (shifted < self.num_local), shifted, torch.full_like(shifted, -1))
        if self.training and self.num_sample < self.num_local:
            index, targets = self._sample(targets)
            weight = w[index]
        else:
            weight = w
        cos = self._cosine(gathered, weight)
        if isinstance(self.margin_loss, MarginLoss):
            logits = self.margin_loss(cos, targets)
        else:  # insightface's contract: clamped cosines (a copy: its margins work in place), (rows, 1) labels
            logits = self.margin_loss(cos.clamp(-1, 1), targets.view(-1, 1))
        return _ShardedSoftmaxCrossEntropy.apply(logits, targets, self._shards)

    def _cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        if not self.fp16:
            return F.linear(embeddings, _normalize_rows(weight))
        half = torch.float16 if weight.device.type == "cuda" else torch.bfloat16
        with torch.autocast(device_type=weight.device.type, dtype=half):
            cos = F.linear(embeddings, _normalize_rows(weight))
        return cos.to(weight.dtype)

    def _sample(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the shard used this step (sorted) and the targets remapped to positions among them."""
        positive = targets[targets >= 0]
        if self._generator is None or self._generator.device != self.weight.device:
            self._generator = torch.Generator(device=self.weight.device)
            self._generator.manual_seed(_sampling_seed(self.seed, self.rank))
        score = torch.rand(self.num_local, generator=self._generator, device=self.weight.device)
        score[positive] = 2.0  # above any uniform draw: kept first by topk
        k = max(self.num_sample, int(torch.unique(positive).numel()))
        index = torch.topk(score, k, sorted=False).indices.sort().values
        remapped = torch.where(targets >= 0, torch.searchsorted(index, targets.clamp_min(0)), targets)
        self.last_sampled_classes = index + self.class_start
        if self._lazy is not None:
            # Union over the forwards since the last step (gradient accumulation samples several times),
            # unless that step never ran and its gradient was zeroed since (see _LazyRowsUpdate).
            if self._rows_used is not None and not self._lazy.rows_pending():
                self._rows_used = None
            used = torch.zeros(self.num_local, dtype=torch.bool, device=index.device)
            used[index] = True
            self._rows_used = used if self._rows_used is None else self._rows_used | used
        elif not self._warned_unbound:
            self._warned_unbound = True
            warnings.warn("shoal: PartialFC samples classes (sample_rate < 1) but no optimizer is bound: an "
                          "optimizer with momentum, weight decay or Adam state will also move the rows not "
                          "used in a step. HINT: call pfc.bind_optimizer(optimizer) once.", stacklevel=3)
        return index, remapped

    def _check_batch_sizes(self, batch: int) -> None:
        if not self._shards.distributed:
            return
        sizes = _all_gather_rows(torch.tensor([batch], dtype=torch.long, device=self.weight.device),
                                 self._shards).tolist()
        if len(set(sizes)) != 1:
            per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(sizes))
            raise ShoalError(f"shoal: PartialFC needs the same local batch size on every rank; rank "
                             f"{self.rank} saw {per_rank}. HINT: use drop_last=True in the DataLoader (and the "
                             "same batch size everywhere) so that no rank has a short last batch.")

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() == 0:
            return
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
        if lo < 0 or hi >= self.num_classes:
            raise ShoalError(f"shoal: PartialFC got labels in [{lo}, {hi}] (gathered from all ranks, seen on "
                             f"rank {self.rank}) but num_classes is {self.num_classes}. HINT: labels must be "
                             "class ids in [0, num_classes).")

    def _check_not_in_ddp(self) -> None:
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None:
            return
        ignored = getattr(ddp, "parameters_to_ignore", set())
        for name, p in ddp.module.named_parameters():
            if p is self.weight and name not in ignored:
                raise ShoalError(
                    f"shoal: PartialFC (rank {self.rank}) runs inside a DistributedDataParallel module that "
                    f"synchronizes its sharded weight '{name}': DDP broadcasts rank 0's shard to every rank "
                    "and averages the shards' gradients. HINT: keep PartialFC outside the DDP module, or call "
                    "shoal.parallel.exclude_from_ddp(model) before wrapping it.")

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest class by cosine for this rank's embeddings, searched over every shard (a collective).

        Returns:
            ``(class_ids, cosines)``, each ``(batch,)``, for this rank's rows.
        """
        self._check_batch_sizes(embeddings.shape[0])
        w = self.weight
        gathered = _all_gather_rows(F.normalize(embeddings.to(w.dtype), dim=1), self._shards)
        best, idx = self._cosine(gathered, w).max(dim=1)
        if self._shards.distributed:
            # Every rank's best (cosine, class id) for every row; pick the best shard per row.
            # float64 holds class ids exactly (up to 2**53; float32 would stop at 2**24).
            pair = torch.stack([best.double(), (idx + self.class_start).double()])
            everyone = _all_gather_rows(pair.unsqueeze(0), self._shards)  # (size, 2, rows)
            winner = everyone[:, 0].argmax(dim=0)
            cols = torch.arange(best.shape[0], device=best.device)
            best, ids = everyone[winner, 0, cols].to(w.dtype), everyone[winner, 1, cols].round().long()
        else:
            ids = idx + self.class_start
        n = embeddings.shape[0]
        mine = slice(self.rank * n, (self.rank + 1) * n)
        return ids[mine], best[mine]

    # -------------------------------------------------------------------------------------------- optimizer
    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> _Binding:
        """Make ``optimizer.step()`` update only the rows used since the previous step (with sampling).

        Unused rows keep their values and their per-element state (momentum, Adam's moments) untouched, as
        if they had not been part of the step; scalar state such as Adam's ``step`` counts every step. A
        no-op without sampling. Call once, after creating the optimizer that holds ``self.weight``; a
        wrapper such as ``shoal.torch.DistributedOptimizer`` may be passed (its inner optimizer is bound).

        Returns:
            A handle; ``handle.remove()`` unbinds.

        Raises:
            ValueError: the optimizer does not hold this module's weight, or another optimizer is bound.
        """
        if not any(p is self.weight for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(f"shoal: PartialFC.bind_optimizer on rank {self.rank}: the optimizer does not hold "
                             "this module's weight. HINT: pass pfc.parameters() to the optimizer first.")
        if self._lazy is not None:
            raise ValueError("shoal: PartialFC already has an optimizer bound. HINT: remove the previous "
                             "handles first.")
        stepping = _stepping_optimizer(optimizer)
        lazy = _LazyRowsUpdate(self)
        handles = (stepping.register_step_pre_hook(lazy.before_step),
                   stepping.register_step_post_hook(lazy.after_step),
                   self.weight.register_post_accumulate_grad_hook(lazy.after_backward))
        self._lazy = lazy
        return _Binding(self, handles)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        """The shard layout: in every shard file, and in ``state_dict()``'s metadata."""
        return {"format": _FORMAT, "num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "class_start": self.class_start, "class_end": self.class_end, "world_size": self.world_size}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The layout rides in the state_dict's metadata (torch keeps it through torch.save/load), not in a
        # key: insightface's PartialFC_V2 has the weight alone, and strict loading in either direction
        # fails on a key the other lacks. Its values are plain ints and strings (weights_only loads them).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_LAYOUT_KEY] = self._layout()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        layout = (local_metadata or {}).get(_LAYOUT_KEY)
        legacy = state_dict.pop(prefix + "_extra_state", None)  # Shoal before the layout moved to metadata
        theirs = layout if isinstance(layout, dict) else legacy if isinstance(legacy, dict) else None
        if theirs is not None:
            mine = (self.class_start, self.class_end, self.num_classes)
            held = (theirs.get("class_start"), theirs.get("class_end"), theirs.get("num_classes"))
            if held != mine:
                raise ShoalError(
                    f"shoal: PartialFC state_dict on rank {self.rank} holds classes [{held[0]}, {held[1]}) of "
                    f"{held[2]} but this rank owns [{mine[0]}, {mine[1]}) of {mine[2]}. HINT: a state_dict is one "
                    "rank's shard; to change the number of ranks use save_sharded()/load_sharded().")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def save_sharded(self, directory: str | os.PathLike,
                     optimizer: Optional[torch.optim.Optimizer] = None) -> str:
        """Write this rank's shard (and its optimizer rows) under ``directory``; a collective.

        A save is committed all at once (constraint 6): the ranks agree on a save id, every rank writes and
        fsyncs ``partial_fc.<save id>.shardRRRRR-of-NNNNN.pt``, and once all have, rank 0 renames the index
        ``partial_fc.json`` (the save id, every shard's class range, writer and size) into place. That rename
        is the commit: a save interrupted before it (a rank dies, a disk fills) leaves the previous save in
        ``directory`` loadable and whole; after it, each rank removes a share of the previous save's files.
        One PartialFC per directory; ``directory`` must be visible to every rank that loads it later.

        Args:
            directory: created if missing.
            optimizer: also store this optimizer's per-row state of the weight (momentum, Adam moments).

        Returns:
            The save id (16 hex digits), the same on every rank, also in the index and in every shard.

        Raises:
            ShoalError: a rank could not write its shard, or a rank failed during the save; the message says
                whether the save was committed. Raised on every rank.

        Example:
            >>> save_id = pfc.save_sharded("ckpt/pfc", optimizer=opt)
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        save_id = self._agree_save_id(directory)
        nbytes, error = -1, None
        try:
            payload = self._shard_payload(save_id, optimizer)
            with atomic_write(os.path.join(directory, _shard_file(save_id, self.rank, self.world_size)),
                              "wb") as f:
                torch.save(payload, f)
                nbytes = f.tell()
        except Exception as exc:  # noqa: BLE001 (re-raised below, after the others learn of it)
            error, nbytes = exc, -1
        # Every rank reports, so that one rank's failure is an error on all, not a hang in the next barrier.
        sizes = self._gather_save_status(nbytes, save_id, directory, before_commit=True)
        if error is not None:
            raise error
        failed = [r for r, n in enumerate(sizes) if n < 0]
        if failed:
            raise ShoalError(
                f"shoal: PartialFC.save_sharded on rank {self.rank}: rank(s) {failed} could not write their "
                f"shard of save {save_id} to {directory!r} (their own error says why). Nothing was committed: "
                "the directory still holds the previous save. HINT: fix the cause on those ranks (disk space, "
                "permissions, a directory every rank can write) and save again.")
        committed, error = 0, None
        if self.rank == 0:
            try:
                _write_index(directory, save_id, self.num_classes, self.embedding_size, self.world_size, sizes)
                committed = 1
            except Exception as exc:  # noqa: BLE001 (re-raised below)
                error = exc
        status = self._gather_save_status(committed, save_id, directory, before_commit=False)
        if error is not None:
            raise error
        if status[0] != 1:
            raise ShoalError(
                f"shoal: PartialFC.save_sharded on rank {self.rank}: rank 0 could not write the index of save "
                f"{save_id} to {directory!r} (its own error says why). Nothing was committed: the directory "
                "still holds the previous save. HINT: fix the cause on rank 0 and save again.")
        _remove_stale_files(directory, save_id, self.rank, self.world_size)
        return save_id

    def _shard_payload(self, save_id: str, optimizer: Optional[torch.optim.Optimizer]) -> dict:
        payload = dict(self._layout())
        payload["save_id"] = save_id
        payload["rank"] = self.rank
        payload["weight"] = self.weight.detach().cpu()
        rows, scalars = {}, {}
        state = optimizer.state.get(self.weight, {}) if optimizer is not None else {}
        _check_row_state(state, self.weight, dist.get_rank() if dist.is_initialized() else 0, "save_sharded")
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == self.weight.shape:
                rows[k] = v.detach().cpu()
            else:
                scalars[k] = v.detach().cpu() if torch.is_tensor(v) else v
        payload["optimizer_rows"], payload["optimizer_scalars"] = rows, scalars
        return payload

    def _agree_save_id(self, directory: str) -> str:
        """Rank 0's random 63 bits, as 16 hex digits, on every rank (one all-gather of one integer)."""
        mine = secrets.randbits(63)
        if self._shards.distributed:
            try:
                mine = int(_all_gather_rows(torch.tensor([mine], dtype=torch.long, device=self._shards.device),
                                            self._shards)[0])
            except Exception as exc:
                raise ShoalError(
                    f"shoal: PartialFC.save_sharded on rank {self.rank}: the ranks could not start a save to "
                    f"{directory!r} ({type(exc).__name__}: {exc}). No file was written. HINT: every rank of "
                    "the classifier must call save_sharded; see the other ranks' errors for the root "
                    "cause.") from exc
        return f"{mine:016x}"

    def _gather_save_status(self, value: int, save_id: str, directory: str, before_commit: bool) -> list[int]:
        """Every rank's ``value`` (an all-gather, so also a barrier); a failed peer becomes a ShoalError
        saying where the save stands: before the commit point, or not known (rank 0 may have committed)."""
        if not self._shards.distributed:
            return [value]
        try:
            return _all_gather_rows(torch.tensor([value], dtype=torch.long, device=self._shards.device),
                                    self._shards).tolist()
        except Exception as exc:
            where = ("Nothing was committed: the directory still holds the previous save" if before_commit
                     else "Rank 0 may or may not have committed it: load_sharded() loads whichever save "
                     "the index names, whole")
            raise ShoalError(
                f"shoal: PartialFC.save_sharded on rank {self.rank}: a rank failed during save {save_id} to "
                f"{directory!r} ({type(exc).__name__}: {exc}). {where}. HINT: see the other ranks' errors "
                "for the root cause; save again once every rank is back.") from exc

    def load_sharded(self, directory: str | os.PathLike,
                     optimizer: Optional[torch.optim.Optimizer] = None) -> str:
        """Load the rows of this rank's class range from a checkpoint saved with any number of ranks.

        No collective: each rank memory-maps only the shard files that overlap its range, and checks that
        each belongs to the save the index names (its save id, class range and size), so shards of two
        saves are never mixed.

        Args:
            directory: what :meth:`save_sharded` wrote.
            optimizer: restore the weight's optimizer state too (it must hold ``self.weight``); rows are
                re-sharded like the weight, scalar state (e.g. Adam's ``step``) is taken from the first shard.

        Returns:
            The id of the save loaded (what :meth:`save_sharded` returned).

        Raises:
            ShoalError: the checkpoint is for another number of classes or embedding size; it has no index
                (never saved, or its only save was interrupted); a shard is missing, damaged or belongs to
                another save (the message names the shard, the rank that wrote it and both save ids).

        Example:
            >>> pfc.load_sharded("ckpt/pfc", optimizer=opt)
        """
        index = _read_index(directory)
        if (index["num_classes"], index["embedding_size"]) != (self.num_classes, self.embedding_size):
            raise ShoalError(f"shoal: PartialFC checkpoint {os.fspath(directory)!r} holds "
                             f"{index['num_classes']} x {index['embedding_size']} but this module is "
                             f"{self.num_classes} x {self.embedding_size} (rank {self.rank}). HINT: build "
                             "PartialFC with the checkpoint's num_classes and embedding_size.")
        rows: dict[str, Tensor] = {}
        scalars: dict = {}
        with torch.no_grad():
            for shard, data in _overlapping_shards(directory, index, self.class_start, self.class_end):
                a, b = max(shard["class_start"], self.class_start), min(shard["class_end"], self.class_end)
                src = slice(a - shard["class_start"], b - shard["class_start"])
                dst = slice(a - self.class_start, b - self.class_start)
                self.weight[dst].copy_(data["weight"][src])
                if optimizer is None:
                    continue
                for k, v in data.get("optimizer_rows", {}).items():
                    if k not in rows:
                        rows[k] = torch.zeros(self.weight.shape, dtype=v.dtype, device=self.weight.device)
                    rows[k][dst].copy_(v[src])
                if not scalars:
                    scalars = dict(data.get("optimizer_scalars", {}))
        if optimizer is not None and (rows or scalars):
            if not any(p is self.weight for g in optimizer.param_groups for p in g["params"]):
                raise ValueError(f"shoal: PartialFC.load_sharded on rank {self.rank}: the optimizer does not "
                                 "hold this module's weight. HINT: pass pfc.parameters() to the optimizer.")
            state = {k: (v.to(self.weight.device) if torch.is_tensor(v) and v.dim() else v)
                     for k, v in scalars.items()}
            state.update(rows)
            optimizer.state[self.weight] = state
        return index.get("save_id", "")

def _shard_file(save_id: str, rank: int, size: int) -> str:
    return f"partial_fc.{save_id}.shard{rank:05d}-of-{size:05d}.pt"


def _write_index(directory: str, save_id: str, num_classes: int, embedding_size: int, size: int,
                 nbytes: list[int]) -> None:
    """The commit point of a save (constraint 6): one atomic, durable rename of the index."""
    shards = []
    for r in range(size):
        start, end = shard_range(num_classes, size, r)
        shards.append({"file": _shard_file(save_id, r, size), "rank": r, "class_start": start, "class_end": end,
                       "nbytes": nbytes[r]})
    index = {"format": _FORMAT, "save_id": save_id, "num_classes": num_classes,
             "embedding_size": embedding_size, "world_size": size, "shards": shards}
    with atomic_write(os.path.join(directory, _INDEX_FILE), "w") as f:
        json.dump(index, f, indent=1)


def _shard_files(directory: str) -> list[tuple[str, re.Match]]:
    """``(name, match)`` of every shard-like file in ``directory`` (shards, their temporary files, format 1)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [(n, m) for n in sorted(names) if (m := _SHARD_RE.match(n)) is not None]


def _saves_not_indexed(directory: str, save_id: Optional[str]) -> str:
    """``save 1a2b... (ranks [0] of 2)`` for each save id other than ``save_id`` with shards here."""
    found: dict[tuple[str, int], list[int]] = {}
    for _, m in _shard_files(directory):
        if not m["tmp"] and m["save"] and m["save"] != save_id:
            found.setdefault((m["save"], int(m["of"])), []).append(int(m["shard"]))
    return "; ".join(f"save {sid} (shards of ranks {ranks} of {of})" for (sid, of), ranks in sorted(found.items()))


def _remove_stale_files(directory: str, save_id: str, rank: int, size: int) -> None:
    """After the commit: files of every other save (earlier, or interrupted) and temporary files.

    Rank ``r`` removes the files of shard numbers ``r mod size`` (rank 0 also the index's temporary files), so
    on a shared file system each file has one remover instead of ``size`` racing ones.
    """
    removed = 0
    for name, m in _shard_files(directory):
        if (m["save"] == save_id and not m["tmp"]) or int(m["shard"]) % size != rank:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    if rank == 0:
        try:
            names = os.listdir(directory)
        except OSError:
            names = []
        for name in names:
            if _INDEX_TMP_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed += 1
    log.debug("shoal: PartialFC rank %d removed %d stale files of %s after committing save %s", rank, removed,
              directory, save_id)


def _read_index(directory) -> dict:
    directory = os.fspath(directory)
    path = os.path.join(directory, _INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        unfinished = _saves_not_indexed(directory, None)
        if unfinished:
            raise ShoalError(
                f"shoal: no PartialFC checkpoint index at {path!r}; the directory holds shards of {unfinished}, "
                "a save interrupted before its commit (the index is written last, once every rank's shard is "
                "on disk), so no complete save is there. HINT: save again from the training job (with every "
                "rank); shards of an unfinished save cannot be loaded.") from None
        raise ShoalError(f"shoal: no PartialFC checkpoint index at {path!r}. HINT: save with "
                         "PartialFC.save_sharded(directory) on every rank first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShoalError(f"shoal: {path!r} is not a PartialFC checkpoint index ({exc}). HINT: the index is "
                         "written whole or not at all by save_sharded; restore the directory from a complete "
                         "copy.") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt == _FORMAT_1:
        warnings.warn(f"shoal: PartialFC checkpoint {directory!r} has format {_FORMAT_1!r}, which carries no "
                      "save id: its shards cannot be checked to belong to one save. HINT: load it once and "
                      "save it again (save_sharded writes the current format).", stacklevel=3)
    elif fmt != _FORMAT:
        raise ShoalError(f"shoal: {path!r} has format {fmt!r}, expected {_FORMAT!r}.")
    for shard in index["shards"]:
        m = _SHARD_RE.match(str(shard.get("file")))
        if m is None or m["tmp"]:
            raise ShoalError(f"shoal: {path!r} names the shard file {shard.get('file')!r}, which is not a "
                             "PartialFC shard name in that directory. HINT: restore the index from the save.")
    return index


def _load_shard(directory: str, index: dict, position: int) -> dict:
    """One shard of the save ``index`` names, checked to be that save's (constraint 6)."""
    shard = index["shards"][position]
    save_id = index.get("save_id")  # None: format 1
    rank = shard.get("rank", position)
    path = os.path.join(directory, shard["file"])
    who = (f"shard {shard['file']!r} (rank {rank} of {index['world_size']}, classes [{shard['class_start']}, "
           f"{shard['class_end']}))")
    where = f"shoal: PartialFC checkpoint {directory!r}"
    if not os.path.exists(path):
        others = _saves_not_indexed(directory, save_id)
        raise ShoalError(
            f"{where}: {who} of save {save_id} is missing" + (f"; other files there: {others}" if others else "")
            + ". HINT: copy a checkpoint as a whole (partial_fc.json and every shard file it names) to a file "
            "system every loading rank can read, or save again.")
    try:
        data, load_error = torch.load(path, map_location="cpu", mmap=True, weights_only=True), None
    except Exception as exc:  # noqa: BLE001 (reported below, with what the index expected)
        data, load_error = None, exc
    if data is not None and not isinstance(data, dict):
        data, load_error = None, TypeError(f"holds a {type(data).__name__}, not a shard")
    if save_id is not None:
        theirs = data.get("save_id") if data is not None else None
        if data is not None and theirs != save_id:
            raise ShoalError(
                f"{where}: {who} holds the shard that rank {data.get('rank')} of {data.get('world_size')} wrote "
                f"in save {theirs}, but the index {_INDEX_FILE} is of save {save_id}: shards of two saves are "
                f"mixed in this directory. HINT: copy a checkpoint as a whole directory ({_INDEX_FILE} with "
                f"the partial_fc.{save_id}.shard* files it names); never combine files of two saves. Load an "
                "intact copy, or save again.")
        size = os.path.getsize(path)
        if load_error is not None or size != shard.get("nbytes"):
            raise ShoalError(
                f"{where}: {who} of save {save_id} is damaged: {size} bytes where the index recorded "
                f"{shard.get('nbytes')}" + (f" ({type(load_error).__name__}: {load_error})" if load_error else "")
                + ". HINT: restore the file from a complete copy of the same save, or save again.")
    elif load_error is not None:
        raise ShoalError(f"{where}: {who} cannot be read ({type(load_error).__name__}: {load_error}). HINT: "
                         "restore it from a complete copy of the checkpoint.") from load_error
    held = (data.get("class_start"), data.get("class_end"), data.get("num_classes"))
    if held != (shard["class_start"], shard["class_end"], index["num_classes"]):
        raise ShoalError(
            f"{where}: {who} holds classes [{held[0]}, {held[1]}) of {held[2]}, written by rank "
            f"{data.get('rank')}, where the index expects [{shard['class_start']}, {shard['class_end']}) of "
            f"{index['num_classes']}: the file was renamed or copied from another rank. HINT: copy the "
            "checkpoint as a whole directory, or save again.")
    return data


def _overlapping_shards(directory, index: dict, start: int, end: int):
    """Yield ``(shard entry, loaded shard)`` for the saved shards overlapping ``[start, end)``."""
    directory = os.fspath(directory)
    for position, shard in enumerate(index["shards"]):
        if shard["class_end"] <= start or shard["class_start"] >= end:
            continue
        yield shard, _load_shard(directory, index, position)


def load_full_weight(directory: str | os.PathLike) -> Tensor:
    """The whole ``(num_classes, embedding_size)`` weight of a sharded checkpoint, on the CPU (no collective).

    For export and evaluation on one process.

    Raises:
        ShoalError: as :meth:`PartialFC.load_sharded`: no index, or a shard missing, damaged or of another save.

    Example:
        >>> w = load_full_weight("ckpt/pfc")   # (num_classes, embedding_size)
    """
    index = _read_index(directory)
    parts = [data["weight"][: shard["class_end"] - shard["class_start"]].clone()
             for shard, data in _overlapping_shards(directory, index, 0, index["num_classes"])]
    return torch.cat(parts, dim=0)
