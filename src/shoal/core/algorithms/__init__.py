"""Per-bucket reduction algorithms: one function each, ``algorithm(buffer, ctx) -> Future``.

An algorithm starts the reduction of one flat bucket in place and returns a ``torch.futures.Future`` that
completes when ``buffer`` holds the reduced, scaled result. Variants (compression, hierarchical) are built
by composition, as torch's DDP comm hooks are; the reducer and the DDP comm-hook adapter both call them, so
each algorithm exists once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.distributed as dist

from .. import runtime
from .flat import allreduce_flat

__all__ = ["ReduceContext", "Algorithm", "get_algorithm", "allreduce_flat"]


@dataclass(slots=True)
class ReduceContext:
    """What an algorithm needs besides the buffer."""

    #: The stream's process group (spans ``process_set``'s ranks).
    group: dist.ProcessGroup
    process_set: runtime.ProcessSet
    #: Multiply before the sum (Horovod's prescale_factor).
    prescale: float = 1.0
    #: Multiply after the sum (Horovod's postscale_factor, times 1/n for Average).
    postscale: float = 1.0
    bucket_index: int = 0
    #: Lazily lists the bucket's tensor names (for error messages only; not called on the hot path).
    names: Optional[Callable[[], list[str]]] = None
    #: Per-bucket state that persists across steps (e.g. error-feedback residuals); owned by the caller,
    #: reset when the bucket plan changes.
    state: dict = field(default_factory=dict)


Algorithm = Callable[["torch.Tensor", ReduceContext], "torch.futures.Future"]  # noqa: F821


def get_algorithm(compression: str, hierarchical: str, process_set: runtime.ProcessSet) -> Algorithm:
    """Pick the algorithm for a reducer from its compression and hierarchical settings."""
    if compression != "none":
        raise NotImplementedError(f"shoal: compression={compression!r} is not available yet")
    return allreduce_flat
