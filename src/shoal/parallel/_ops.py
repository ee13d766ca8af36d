"""The collectives behind the sharded classifier, as autograd functions.

Owns: the class-shard process group handle (:class:`_Shards`), the all-gather of embeddings whose backward
reduce-scatters the gradient, and the softmax cross-entropy over a class-sharded logits matrix. The
module and its API live in :mod:`shoal.parallel.partial_fc`.

Design constraints:

1. Communication per step is independent of the number of classes: embeddings (rows x dim) and labels
   go out once, the softmax needs two allreduces of one value per row (row max; sum of exponentials
   packed with the target logit), and the backward reduce-scatters the embedding gradient. Nothing of
   size ``classes`` ever crosses the wire.
2. Plain ``torch.distributed`` calls on the process set's group, so gloo and NCCL behave alike.
3. A world of one (or no process group at all) runs the same code with the collectives skipped, so a
   single process can train and the unit tests need no ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__: list[str] = []

# torch 2.13 renamed the tensor-in/tensor-out collectives (the old names warn); torch >= 2.4 has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True, slots=True)
class _Shards:
    """Who shares the classifier: the group, this rank's index in it and the group size."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    #: where the collectives run: the rank's GPU under NCCL, else the CPU
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _resolve_shards(process_set) -> _Shards:
    """Group of the process set; the torch default group when Shoal is not initialized; else a world of one.

    Raises:
        ValueError: the calling rank is not a member of ``process_set``.
    """
    from shoal.core import runtime  # noqa: PLC0415 (keeps `import shoal.parallel` free of side effects)

    if runtime.is_initialized():
        ps = runtime.get_process_set(process_set)
        if not ps.included():
            raise ValueError(f"shoal: PartialFC created on rank {runtime.rank()}, which is not in {ps!r}. "
                             "HINT: create the classifier only on the ranks of its process set.")
        return _Shards(ps.group, ps.rank(), ps.size(), runtime.device())
    if process_set is not None:
        raise ValueError("shoal: PartialFC got a process_set but shoal.init() has not run. "
                         "HINT: call shoal.torch.init() first, or pass process_set=None.")
    if dist.is_available() and dist.is_initialized():
        # A plain torch.distributed (e.g. DDP) program: shard across the default group.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        return _Shards(None, dist.get_rank(), dist.get_world_size(), device)
    return _Shards(None, 0, 1, torch.device("cpu"))


def _all_gather_rows(x: Tensor, shards: _Shards) -> Tensor:
    """``(n, ...)`` on every rank -> ``(size * n, ...)`` in rank order (no autograd)."""
    if not shards.distributed:
        return x
    x = x.contiguous()
    out = x.new_empty((shards.size * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=shards.group)
    return out


def _reduce_scatter_rows(x: Tensor, shards: _Shards) -> Tensor:
    """Sum ``(size * n, ...)`` over ranks and keep this rank's ``n`` rows."""
    if not shards.distributed:
        return x
    x = x.contiguous()
    n = x.shape[0] // shards.size
    out = x.new_empty((n, *x.shape[1:]))
    try:
        _reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=shards.group)
    except RuntimeError as exc:
        # Older gloo builds lack reduce_scatter and refuse before communicating (on every rank alike);
        # an allreduce moves size-times more bytes but gives the same sum.
        if "support" not in str(exc):
            raise
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shards.group)
        out = x[shards.rank * n:(shards.rank + 1) * n].clone()
    return out


class _AllGatherEmbeddings(torch.autograd.Function):
    """All-gather rows forward; reduce-scatter (sum) of the gradient backward, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, shards: _Shards, grad_scale: float) -> Tensor:
        ctx.shards = shards
        ctx.grad_scale = grad_scale
        return _all_gather_rows(x, shards)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        out = _reduce_scatter_rows(grad, ctx.shards)
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


class _NormalizeRows(torch.autograd.Function):
    """``w / ||w||`` per row, with a fused backward.

    The classifier shard is the largest tensor of the step; autograd's ``F.normalize`` backward takes about
    seven passes over it (div, neg, mul, div, expand-sum, norm backward). Measured on one CPU core at
    500k x 128: normalize forward + backward was 50% of the step, ahead of the matmul. This backward takes
    three: ``(g - y * sum(g * y)) / ||w||``.
    """

    @staticmethod
    def forward(ctx, w: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(eps)
        y = w / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        y, norm = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, y, dim=1).unsqueeze(1)
        grad = torch.addcmul(g, y, dot, value=-1.0)
        grad.div_(norm)
        return grad, None


def _normalize_rows(w: Tensor, eps: float = 1e-12) -> Tensor:
    return _NormalizeRows.apply(w, eps)


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows whose logits are split by columns across the ranks of ``shards``.

    ``targets[i]`` is the column of row i's class in this rank's logits, or -1 when another rank holds it.
    Every rank returns the same loss. The backward gives each rank the gradient of its own columns.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, shards: _Shards) -> Tensor:
        n_rows = logits.shape[0]
        row_max = logits.max(dim=1).values if logits.shape[1] else \
            logits.new_full((n_rows,), float("-inf"))
        if shards.distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shards.group)
        probs = logits - row_max.unsqueeze(1)
        probs.exp_()
        rows = torch.nonzero(targets >= 0).squeeze(1)
        cols = targets[rows]
        # One allreduce carries both sums: [sum_j exp(z_ij - max_i) | z_i,target - max_i (0 off-shard)].
        # The sums are float32 for 16-bit logits: each term is <= 1, but a row's sum reaches the number of
        # classes, and float16 ends at 65504 (a 100k-class softmax at small logits gave inf without this;
        # tests/dist/test_partial_fc.py::test_fp16_weights_with_more_classes_than_float16_can_count).
        acc = torch.float32 if logits.element_size() < 4 else logits.dtype
        packed = logits.new_zeros((2, n_rows), dtype=acc)
        torch.sum(probs, dim=1, dtype=acc, out=packed[0])
        packed[1].index_put_((rows,), (logits[rows, cols] - row_max[rows]).to(acc))
        if shards.distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shards.group)
        sum_exp, target_shifted = packed[0], packed[1]
        # log-softmax of the target, computed from sums rather than from an exp that may underflow.
        loss = (torch.log(sum_exp) - target_shifted).mean().to(logits.dtype)
        # exp / sum <= 1: the quotient fits the logits' dtype even where the sum did not.
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, rows, cols)
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        if ctx.consumed:
            raise RuntimeError(
                "shoal: PartialFC's softmax backward ran twice on the same graph; it reuses its saved "
                "probabilities in place. HINT: run the forward again instead of backward(retain_graph=True).")
        ctx.consumed = True
        probs, rows, cols = ctx.saved_tensors
        # d(mean CE)/d logits = (softmax - onehot) / rows, on this rank's columns; in place (saves a copy
        # of the largest tensor of the step).
        grad = probs
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / probs.shape[0])
        return grad, None, None
