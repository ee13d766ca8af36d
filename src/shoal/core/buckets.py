"""Bucket planning, as pure functions: which gradients share a flat buffer, and in what order.

Design constraints:

1. Buckets follow the order in which gradients become ready during backward (learned in the first step;
   before that, reverse registration order, which is roughly backward order for feed-forward models), so that
   a bucket fills up as early as possible and can go on the wire while backward continues.
2. The first bucket is small (``first_bucket_nbytes``) so that the wire starts early; the rest are
   ``bucket_nbytes``. A tensor larger than a bucket gets a bucket of its own (never split: a gradient is a
   view into exactly one buffer).
3. A bucket holds one dtype on one device (one flat buffer, one collective).
4. Every rank must compute the same plan from the same inputs: no dict-order or set-order dependence.

What lives elsewhere: the buffers and the collectives (:mod:`shoal.core.reducer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["TensorSpec", "BucketPlan", "plan_buckets", "ALIGN_NUMEL", "ALIGN_BYTES", "align_numel"]

#: Every view inside a bucket starts on a multiple of this many bytes, whatever its dtype: TensorFlow aborts
#: at the first op on a DLPack buffer that is not 64-byte aligned (measured with TF 2.21: bfloat16/float16
#: views 32 bytes off abort, docs/keras.md); vector loads like it too.
ALIGN_BYTES = 64
#: The padding unit in elements for 4-byte dtypes (64 bytes); kept for the negotiation's control slot.
ALIGN_NUMEL = 16


def align_numel(dtype: torch.dtype) -> int:
    """Elements per alignment unit for ``dtype``: 64 bytes' worth, and never fewer than ``ALIGN_NUMEL``."""
    return max(ALIGN_NUMEL, ALIGN_BYTES // dtype.itemsize)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the engine needs to know about one named tensor (a gradient)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True, slots=True)
class BucketPlan:
    """One bucket: the indices of its tensors (in ready order) and their offsets in its flat buffer."""

    index: int
    tensor_ids: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _aligned(n: int, unit: int = ALIGN_NUMEL) -> int:
    return (n + unit - 1) // unit * unit


def plan_buckets(specs: Sequence[TensorSpec], order: Optional[Sequence[int]] = None, *,
                 bucket_nbytes: int, first_bucket_nbytes: Optional[int] = None,
                 groups: Optional[Sequence[Sequence[int]]] = None) -> list[BucketPlan]:
    """Split tensors into buckets.

    Args:
        specs: every tensor, indexed by position.
        order: the ready order (a permutation of ``range(len(specs))``); default reverse of ``specs``.
        bucket_nbytes: target size of every bucket but the first.
        first_bucket_nbytes: target size of the first bucket; default ``bucket_nbytes``.
        groups: explicit grouping (Horovod's ``groups=``): each inner list becomes its own bucket(s), split
            further by dtype/device; overrides the sizes.

    Returns:
        Buckets in launch order. Every tensor appears in exactly one bucket.

    Example:
        >>> s = [TensorSpec(f"w{i}", (256,), torch.float32, torch.device("cpu")) for i in range(4)]
        >>> [b.tensor_ids for b in plan_buckets(s, bucket_nbytes=2048, first_bucket_nbytes=1024)]
        [(3,), (2, 1), (0,)]
    """
    n = len(specs)
    order = list(range(n - 1, -1, -1)) if order is None else list(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"plan_buckets: order must be a permutation of 0..{n - 1}, got {order}")
    first = bucket_nbytes if first_bucket_nbytes is None else first_bucket_nbytes
    if groups is not None:
        seen = sorted(i for g in groups for i in g)
        if seen != list(range(n)):
            raise ValueError("plan_buckets: groups must cover every tensor exactly once")
        position = {t: p for p, t in enumerate(order)}
        chunks = [sorted(g, key=position.__getitem__) for g in groups if len(g)]
        chunks.sort(key=lambda g: position[g[0]])
        limits = None
    else:
        chunks = [order]
        limits = (first, bucket_nbytes)

    plans: list[BucketPlan] = []
    for chunk in chunks:
        # Open buckets per (dtype, device): tensors of another dtype do not close the current bucket.
        open_: dict[tuple, list[int]] = {}
        sizes: dict[tuple, int] = {}
        keys_in_order: list[tuple] = []

        def close(key: tuple) -> None:
            ids = open_.pop(key)
            sizes.pop(key)
            keys_in_order.remove(key)
            offsets, total = [], 0
            unit = align_numel(specs[ids[0]].dtype)
            for i in ids:
                offsets.append(total)
                total += _aligned(specs[i].numel, unit)
            plans.append(BucketPlan(len(plans), tuple(ids), tuple(offsets), total,
                                    specs[ids[0]].dtype, specs[ids[0]].device))

        for i in chunk:
            key = (specs[i].dtype, specs[i].device)
            if limits is not None and open_.get(key) and \
                    specs[i].nbytes >= (limits[0] if not plans else limits[1]):
                close(key)  # constraint 2: an oversize tensor travels alone; the ones before it go now
            if key not in open_:
                open_[key], sizes[key] = [], 0
                keys_in_order.append(key)
            open_[key].append(i)
            sizes[key] += specs[i].nbytes
            if limits is not None:
                limit = limits[0] if not plans else limits[1]
                if sizes[key] >= limit:
                    close(key)
        for key in list(keys_in_order):
            close(key)
    return plans
