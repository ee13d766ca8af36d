"""``SyncBatchNorm``: batch normalization with statistics over the whole process set (Horovod's
``hvd.SyncBatchNorm``), on CPU (gloo) as on GPU.

``torch.nn.SyncBatchNorm`` runs on accelerators only; Horovod's needs Horovod. This one is plain autograd
over :mod:`shoal.core.collectives`, so a mismatch across ranks (one rank skipping the layer, another
channel count) is a named error, not a hang.

Design constraints:

1. The same numbers as ``BatchNorm`` on the concatenated batch: the batch mean and (biased) variance over
   every rank's samples normalize, the unbiased variance over all of them goes into ``running_var``. Ranks
   may hold different batch sizes, also 0.
2. Numerically stable: each rank contributes its count, mean and sum of squared deviations (``M2``), combined
   with Chan's parallel formula, never ``E[x^2] - E[x]^2``. One allreduce in forward (a ``world x (2C+1)``
   table, each rank filling its row, so the sum is exact) and one in backward (``2C`` sums).
3. Gradients: ``weight`` and ``bias`` get this rank's share (the DistributedOptimizer averages them like any
   parameter); the input gradient uses the global sums of ``dy`` and ``dy * x_hat``, as in torch's.
   Together that is the gradient of the mean of the ranks' losses.
4. Outside training (or with one rank, or before ``init()``) it is ``BatchNorm``: no collective (in eval
   with ``track_running_stats=False`` the batch statistics are this rank's, as in torch's).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from shoal.core import collectives as _c
from shoal.core import runtime

__all__ = ["SyncBatchNorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, factor, process_set, name):
        c = x.shape[1]
        dims = _reduce_dims(x)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(stat_dtype)
        n = x.numel() // c if c else 0
        rows = torch.zeros(process_set.size(), 2 * c + 1, dtype=stat_dtype, device=x.device)
        me = process_set.rank()
        if n > 0:
            var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
            rows[me, 0] = n
            rows[me, 1:c + 1] = mean
            rows[me, c + 1:] = var * n
        rows = _c.allreduce(rows, name=f"{name}.statistics", op=_c.Sum, process_set=process_set)
        counts, means, m2s = rows[:, :1], rows[:, 1:c + 1], rows[:, c + 1:]
        total = float(counts.sum().item())
        if total == 0:
            raise ValueError(f"shoal: {name}: every rank's batch is empty; batch normalization needs at least "
                             "one sample somewhere. HINT: skip the step, or put the model in eval().")
        if total == 1:
            raise ValueError(f"shoal: {name}: one value per channel over all ranks (input {tuple(x.shape)} "
                             "here); batch normalization in training needs more than one.")
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            unbiased = m2 / (total - 1) if total > 1 else var
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(stat_dtype).view(shape)
        if bias is not None:
            y = y + bias.to(stat_dtype).view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.process_set, ctx.name, ctx.has_bias = total, process_set, name, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[1]
        dims = _reduce_dims(xhat)
        shape = [1, c] + [1] * (xhat.dim() - 2)
        g = grad_out.to(xhat.dtype)
        sum_g = g.sum(dims)
        sum_gx = (g * xhat).sum(dims)
        grad_weight = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g.to(weight.dtype if weight is not None else g.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = _c.allreduce(torch.cat([sum_g, sum_gx]), name=f"{ctx.name}.backward", op=_c.Sum,
                                process_set=ctx.process_set)
            mean_g, mean_gx = both[:c] / ctx.total, both[c:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
            grad_x = ((g - mean_g.view(shape) - xhat * mean_gx.view(shape)) * scale.view(shape)).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the samples of every rank of ``process_set`` (constraints 1-4).

    Same arguments as ``torch.nn.BatchNorm2d`` (and any input of 2 or more dimensions, channels second),
    plus ``process_set`` (default: all ranks). ``SyncBatchNorm.convert_sync_batchnorm(model)`` swaps every
    ``BatchNorm*d`` of a model for one, keeping its weights and running statistics.

    Example:
        >>> model = hvd.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                named_parameters=model.named_parameters())
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 process_set: Optional[runtime.ProcessSet] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"shoal: SyncBatchNorm expects an input of 2 or more dimensions (N, C, ...), "
                             f"got {input.dim()}D")
        if input.shape[1] != self.num_features:
            raise ValueError(f"shoal: SyncBatchNorm({self.num_features}) got {input.shape[1]} channels "
                             f"(input shape {tuple(input.shape)})")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        ps = None
        if batch_stats and self.training and runtime.is_initialized():  # eval: local, as torch's
            ps = runtime.get_process_set(self.process_set, "SyncBatchNorm")
            if ps.size() < 2 or not ps.included():
                ps = None
        track = not self.training or self.track_running_stats
        if ps is None:  # constraint 4: plain BatchNorm
            return F.batch_norm(input, self.running_mean if track else None,
                                self.running_var if track else None, self.weight, self.bias,
                                batch_stats, factor, self.eps)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None, self.eps, factor, ps,
            f"SyncBatchNorm({self.num_features})")

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_set: Optional[runtime.ProcessSet] = None) -> torch.nn.Module:
        """``module`` with every ``torch.nn`` batch norm (``BatchNorm1d/2d/3d``, torch's ``SyncBatchNorm``)
        replaced by a :class:`SyncBatchNorm` holding the same parameters and buffers; returns the new root."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_set=process_set)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_set))
        return out
