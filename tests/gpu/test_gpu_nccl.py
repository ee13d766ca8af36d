"""A world of one on NCCL: ``init()``, the engine's streams, user collectives, training steps, the NaN check.

The one place where NCCL itself runs on a single GPU (two ranks on one device are refused by NCCL). In a
world of one ``DistributedOptimizer`` is the bare optimizer (nothing to reduce); ``op=Sum`` keeps the
engine on, so that its buckets, its stream groups (on NCCL each communicator has its own CUDA stream) and
the NaN check's flags (kept on the device under NCCL, shoal.core.checks) all run. References: the same
model trained by the bare torch optimizer in the same process; a sum over one rank changes nothing, so
the results must be bitwise equal. The CPU parametrization runs the same code on gloo (in CI).
"""

from __future__ import annotations

import copy

import pytest
import torch

from _gpu import DEADLINE_S, cuda_and_cpu
from shoal.testing import run_ranks


def _train(model, opt, steps: int, device: str) -> None:
    from test_optimizer import _batch, _loss  # noqa: PLC0415

    for step in range(steps):
        x, y = (t.to(device) for t in _batch(step))
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def _nan_policy(policy: str, device: str) -> dict:
    """One NaN in ``mid.weight`` at step 2 under ``policy``; what happened to the step and the weights."""
    import shoal.torch as hvd  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from test_nan_check import _batch, _inject, _setup, _summary  # noqa: PLC0415

    model, opt = _setup(policy, device=device, op=hvd.Sum)
    at = {"step": 0, "when": 2}
    _inject(model, "mid.weight", at, rank=0, value=float("nan"))
    out = {"raised_at": None, "report": None}
    for step in range(1, 4):
        at["step"] = step
        x, y = (t.to(device) for t in _batch(0, step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
        except hvd.NonFiniteGradientError as err:
            out.update(raised_at=step, report=_summary(err.report))
            out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            break
        if opt.nan_report is not None and out["report"] is None:  # warn: step 3 is all NaN, reported again
            out["report"] = _summary(opt.nan_report)
            out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            out["finite_after"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    out["skipped"] = opt.skipped_steps
    return out


def _world_of_one(device: str) -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.core import runtime  # noqa: PLC0415
    from test_optimizer import _make_opt, _mlp  # noqa: PLC0415

    hvd.init()
    dev = torch.device(device)
    out = {"backend": dist.get_backend(), "device": runtime.device().type, "size": hvd.size()}
    # The engine's streams: a process group each (under NCCL a communicator, with its own CUDA stream).
    streams = runtime.stream_groups(hvd.global_process_set, 3)
    out["stream_backends"] = sorted({dist.get_backend(g) for g in streams})

    # User collectives on the device: over one rank each returns its input (Sum, gather, scatter alike).
    x = torch.arange(12.0, device=dev).reshape(6, 2)
    results = {
        "allreduce": hvd.allreduce(x, op=hvd.Sum), "average": hvd.allreduce(x),
        "allgather": hvd.allgather(x), "broadcast": hvd.broadcast(x, root_rank=0),
        "alltoall": hvd.alltoall(x), "reducescatter": hvd.reducescatter(x, op=hvd.Sum),
        "grouped": hvd.grouped_allreduce([x, x.half()], op=hvd.Sum)[1].float(),
        "async": hvd.synchronize(hvd.allreduce_async(x, op=hvd.Sum)),
    }
    out["collectives"] = {k: (v.device.type, bool(torch.equal(v, x))) for k, v in results.items()}
    out["objects"] = (hvd.broadcast_object({"a": 1}), hvd.allgather_object(7))
    hvd.barrier()

    # A step: in a world of one the wrapper leaves the gradients alone (the bare optimizer, bitwise).
    model = _mlp().to(dev)
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("adam", model.parameters()), named_parameters=model.named_parameters())
    _train(model, opt, 3, device)
    _train(ref, _make_opt("adam", ref.parameters()), 3, device)
    out["bare_equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))

    # Steps through the engine: op=Sum, ~0.1 MB buckets over 3 streams (a sum over one rank: bitwise).
    model = _mlp(width=256).to(dev)
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()), named_parameters=model.named_parameters(),
                                   op=hvd.Sum, fusion_threshold_mb=0.1, first_bucket_mb=0.05, num_streams=3)
    _train(model, opt, 4, device)
    _train(ref, _make_opt("sgd", ref.parameters()), 4, device)
    out["engine_equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    out["buckets"], out["streams"] = opt.engine.num_buckets, opt.engine.num_streams
    out["nan"] = {policy: _nan_policy(policy, device) for policy in ("raise", "skip", "warn")}
    return out


@pytest.mark.parametrize("device", cuda_and_cpu())
def test_world_of_one_init_streams_collectives_and_steps(device):
    backend = "nccl" if device == "cuda" else "gloo"
    (r,) = run_ranks(_world_of_one, world_size=1, timeout_s=DEADLINE_S, args=(device,), init=False,
                     env={"SHOAL_BACKEND": backend})
    assert (r["backend"], r["device"], r["size"]) == (backend, device, 1)
    assert r["stream_backends"] == [backend]
    assert r["collectives"] == {k: (device, True) for k in r["collectives"]}, r["collectives"]
    assert r["objects"] == ({"a": 1}, [7])
    assert r["bare_equal"], "a world of one must leave the optimizer bare"
    assert r["engine_equal"], "op=Sum over one rank must not change a gradient"
    assert r["buckets"] >= 3 and r["streams"] == 3, (r["buckets"], r["streams"])
    raised, skipped, warned = (r["nan"][p] for p in ("raise", "skip", "warn"))
    for policy, res in r["nan"].items():
        rep = res["report"]
        assert rep is not None and rep["step"] == 2 and rep["names"] == ["mid.weight"], (policy, res)
        assert rep["ranks"] == [0] and rep["kinds"] == ["nan"] and rep["policy"] == policy, (policy, rep)
    assert raised["raised_at"] == 2 and raised["unchanged"], raised
    assert skipped["skipped"] == 1 and skipped["unchanged"] and skipped["finite_after"], skipped
    assert warned["skipped"] == 0 and not warned["unchanged"] and not warned["finite_after"], warned
