"""``shoal.torch.comm_hook``: DDP with Shoal's per-bucket algorithm equals DDP's default, on 2 gloo ranks.

Tolerance. DDP's default divides each gradient by the world size and sums; the hook sums and multiplies
by 1/size. With 2 ranks both are exact operations apart from the one rounding of the sum (halving is
exact in binary floating point, barring subnormals), so the gradients agree to the bit in practice; the
assertion allows 1e-7 times the gradient scale so that it does not depend on that argument. Parameters
after a few SGD steps are compared the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch

from shoal.testing import run_ranks

_STEPS = 3
_BATCH = 16


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _counting_hook(state, bucket):
    """Shoal's hook, recording which bucket indices DDP hands it (no annotations: DDP accepts that)."""
    shoal_state, hook, seen = state
    seen.add(bucket.index())
    return hook(shoal_state, bucket)


def _rank_ddp(num_streams: int):
    import torch.distributed as dist  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    rank, world = hvd.rank(), hvd.size()
    plain, hooked = _model(), _model()
    # ~2 KB buckets: the 4 KB weights travel alone, so DDP hands the hook several buckets per step.
    ddp_plain = DDP(plain, bucket_cap_mb=0.002)
    ddp_hooked = DDP(hooked, bucket_cap_mb=0.002)
    shoal_state, hook = hvd.comm_hook(num_streams=num_streams)
    seen: set[int] = set()
    ddp_hooked.register_comm_hook((shoal_state, hook, seen), _counting_hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ddp_plain, ddp_hooked)]
    ref = copy.deepcopy(plain)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    grad_diff, grad_scale, ref_diff = 0.0, 0.0, 0.0
    for step in range(_STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(_BATCH, 8, generator=g), torch.randn(_BATCH, 4, generator=g)
        n = _BATCH // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        seen.clear()
        for m, o in zip((ddp_plain, ddp_hooked), opts):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(xs), ys).backward()
        for p, q in zip(plain.parameters(), hooked.parameters()):
            grad_diff = max(grad_diff, (p.grad - q.grad).abs().max().item())
            grad_scale = max(grad_scale, p.grad.abs().max().item())
        for o in opts:
            o.step()
        # And both against a single process on the full batch (summation order differs: ~1e-7).
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    ref_diff = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), hooked.parameters()))
    dist.barrier()
    return {"grad_diff": grad_diff, "grad_scale": grad_scale, "buckets": sorted(seen),
            "param_diff": max((p - q).abs().max().item() for p, q in zip(plain.parameters(), hooked.parameters())),
            "ref_diff": ref_diff, "params": [p.detach().clone() for p in hooked.parameters()]}


@pytest.mark.parametrize("num_streams", [1, 3])
def test_comm_hook_equals_ddp_default(num_streams):
    results = run_ranks(_rank_ddp, world_size=2, timeout_s=60, args=(num_streams,))
    for r in results:
        assert len(r["buckets"]) >= 3, r["buckets"]  # several buckets per step (after DDP's rebuild)
        assert r["grad_diff"] <= 1e-7 * r["grad_scale"], r
        assert r["param_diff"] <= 1e-7, r
        assert r["ref_diff"] <= 1e-6, r
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
