"""``shoal.torch.SyncBatchNorm`` against ``torch.nn.BatchNorm*d`` on the concatenated batch, on real gloo ranks.

Each rank runs the single-process reference itself (the full batch through a plain BatchNorm with the same
initial state) and compares within the rank.

Tolerance (fp32): the statistics are the same sums in another order (per-rank mean and M2 combined with
Chan's formula, versus one pass over the whole batch), so outputs, gradients and running statistics differ
by a few ulps. Measured maxima: 4.8e-7 on outputs and input gradients (values of order 1), 1.9e-6 on
``running_var`` (values ~9, so 2e-7 relative), 2.4e-7 on the weights after training. ``_ATOL = 1e-5``.
"""

from __future__ import annotations

import pytest
import torch

from shoal.testing import run_ranks

_ATOL = 1e-5


def _full_batch(n: int, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 4, 5, generator=g) * 3 + 2  # mean far from 0: a naive E[x^2]-E[x]^2 would lose digits
    w = torch.randn(n, c, 4, 5, generator=g)           # the loss's weights: sum(y * w)
    return x, w


def _rank_stats(sizes: list[int], momentum, device: str = "cpu"):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    rank = hvd.rank()
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        ref.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
    sbn = hvd.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(ref)).get_submodule("0").to(device)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).to(device)
    ref.load_state_dict(sbn.state_dict())
    out = {"diff_y": 0.0, "diff_dx": 0.0, "dw": [], "db": [], "ref_dw": [], "ref_db": []}
    for step in range(2):
        x, w = (t.to(device) for t in _full_batch(sum(sizes), seed=step))
        xr = x.clone().requires_grad_(True)
        yr = ref(xr)
        (yr * w).sum().backward()
        xl = x[lo:hi].clone().requires_grad_(True)
        yl = sbn(xl)
        (yl * w[lo:hi]).sum().backward()
        if hi > lo:
            out["diff_y"] = max(out["diff_y"], (yl - yr[lo:hi]).abs().max().item())
            out["diff_dx"] = max(out["diff_dx"], (xl.grad - xr.grad[lo:hi]).abs().max().item())
        out["dw"].append(sbn.weight.grad.cpu().clone())
        out["db"].append(sbn.bias.grad.cpu().clone())
        out["ref_dw"].append(ref.weight.grad.cpu().clone())
        out["ref_db"].append(ref.bias.grad.cpu().clone())
        sbn.zero_grad()
        ref.zero_grad()
    out["diff_running"] = max((sbn.running_mean - ref.running_mean).abs().max().item(),
                              (sbn.running_var - ref.running_var).abs().max().item())
    out["tracked"] = (int(sbn.num_batches_tracked), int(ref.num_batches_tracked))
    sbn.eval()
    ref.eval()
    x, _ = _full_batch(4, seed=9)
    x = x.to(device)
    out["diff_eval"] = (sbn(x) - ref(x)).abs().max().item()
    return out


@pytest.mark.parametrize("sizes,momentum", [([6, 6], 0.1), ([3, 9], 0.1), ([4, 0, 5], None)],
                         ids=["even", "uneven", "empty-rank-cumulative"])
def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch(sizes, momentum):
    """Output, input gradient, running statistics and eval output equal BatchNorm2d's on the concatenated
    batch; the ranks' weight and bias gradients sum to the reference's (the optimizer averages them)."""
    _check_stats(sizes, run_ranks(_rank_stats, world_size=len(sizes), timeout_s=60, args=(sizes, momentum)))


def _check_stats(sizes: list[int], results) -> None:
    """What :func:`_rank_stats` must show on every rank (tests/gpu checks its CUDA runs with this too)."""
    for r in results:
        assert r["diff_y"] < _ATOL and r["diff_dx"] < _ATOL, r
        assert r["diff_running"] < _ATOL and r["diff_eval"] < _ATOL, r
        assert r["tracked"] == (2, 2)
    for step in range(2):
        for key in ("dw", "db"):
            total = sum(r[key][step] for r in results)
            assert torch.allclose(total, results[0]["ref_" + key][step], atol=_ATOL * sum(sizes)), key


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 5, 2), torch.nn.BatchNorm1d(2))


def _rank_training(device: str = "cpu"):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    if device != "cpu":
        # cuDNN convolutions may use TF32 by default (10 bits of mantissa): the model and its reference
        # would then differ by TF32 rounding, far above _ATOL. The comparison is about the statistics.
        torch.backends.cudnn.allow_tf32 = False
    rank, world = hvd.rank(), hvd.size()
    model = hvd.SyncBatchNorm.convert_sync_batchnorm(_net()).to(device)
    assert sum(isinstance(m, hvd.SyncBatchNorm) for m in model.modules()) == 2
    ref = _net().to(device)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, _ = _full_batch(8, seed=step)
        y = torch.randn(8, 2, generator=torch.Generator().manual_seed(100 + step))
        x, y = x.to(device), y.to(device)
        n = 8 // world
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values())
               if a.is_floating_point())
    return diff


def test_training_with_sync_batch_norm_equals_single_process_training():
    """Three SGD steps of a conv net whose BatchNorm2d/1d were converted, 2 ranks with half the batch each,
    equal one process on the whole batch: weights and running statistics within the tolerance."""
    for diff in run_ranks(_rank_training, world_size=2, timeout_s=60):
        assert diff < _ATOL


def _rank_errors():
    import shoal.torch as hvd  # noqa: PLC0415

    sbn = hvd.SyncBatchNorm(3)
    messages = []
    for bad in (torch.randn(4, 5, 2), torch.randn(4)):
        with pytest.raises(ValueError) as err:
            sbn(bad)
        messages.append(str(err.value))
    with pytest.raises(ValueError) as err:
        sbn(torch.randn(0, 3, 2))  # empty on every rank
    messages.append(str(err.value))
    with pytest.raises(ValueError) as err:
        sbn(torch.randn(1 - hvd.rank(), 3))  # one value per channel in all
    messages.append(str(err.value))
    local = hvd.SyncBatchNorm(3, track_running_stats=False).eval()  # eval: this rank's own statistics
    x = torch.randn(4, 3) + hvd.rank()
    messages.append(torch.equal(local(x), torch.nn.BatchNorm1d(3, track_running_stats=False).eval()(x)))
    return messages


def test_sync_batch_norm_errors_name_the_problem():
    for messages in run_ranks(_rank_errors, world_size=2, timeout_s=60):
        assert "got 5 channels" in messages[0]
        assert "2 or more dimensions" in messages[1]
        assert "every rank's batch is empty" in messages[2]
        assert "more than one" in messages[3]
        assert messages[4] is True
