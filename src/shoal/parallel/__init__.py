"""Model parallelism: a class-sharded margin-softmax classifier (InsightFace-type, Partial FC).

The backbone stays data parallel (Shoal's DistributedOptimizer or DDP); the classifier's weight is split by
class across ranks and never averaged. See ``docs/partial_fc.md``.

Example:
    >>> from shoal.parallel import PartialFC, ArcFace
    >>> pfc = PartialFC(embedding_size=512, num_classes=1_000_000, margin_loss=ArcFace(s=64.0, m=0.5))
    >>> loss = pfc(backbone(images), labels)
"""

from __future__ import annotations

from .global_grads import clip_grad_norm_, sync_grad_scaler_
from .margins import ArcFace, CombinedMargin, CosFace, MarginLoss
from shoal.core.no_sync import NO_SYNC_ATTR, is_no_sync, mark_no_sync
from .partial_fc import PartialFC, exclude_from_ddp, load_full_weight, shard_range

__all__ = [
    "PartialFC",
    "MarginLoss",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
    "shard_range",
    "exclude_from_ddp",
    "load_full_weight",
    "NO_SYNC_ATTR",
    "mark_no_sync",
    "is_no_sync",
    "clip_grad_norm_",
    "sync_grad_scaler_",
]


def __dir__() -> list[str]:
    return sorted(__all__)
