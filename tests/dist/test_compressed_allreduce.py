"""16-bit compression on real gloo ranks: the compressed allreduce against the float32 reference, overflow,
error feedback, the optimizer and the DDP hook.

Tolerance of a 16-bit average (written out). Unit roundoff u = 2**-11 (float16), 2**-8 (bfloat16).
Each rank's contribution x_j / n travels rounded once (relative error <= u; with more than two ranks a
rank's own piece does not travel), the float32 sum of the n contributions is rounded once more by its
owner (with two ranks it is not: both add the same two rounded values and keep the float32 sum). So, elementwise,
|result - mean| <= u * sum_j |x_j| / n + u * |sum| (1 + u) <= 2.01 * u * max_j |x_j|, plus 2**-24 for
float16 subnormals; float32 sums add ~1e-7 relative, far below.
"""

from __future__ import annotations

import functools

import pytest
import torch

from shoal.testing import run_ranks

_U = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "mixed_fp16": 2.0 ** -11, "mixed_bf16": 2.0 ** -8}


def _tolerance(compression: str, max_abs: float) -> float:
    return 2.01 * _U[compression] * max_abs + 2.0 ** -24


def _reduce(compression: str, hierarchical: str, tensors: list, *, op_sum: bool = False,
            error_feedback: bool = False, num_streams: int = 2, states=None):
    """Reduce each tensor as one bucket with the engine's algorithm; buckets rotate over the streams."""
    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, get_algorithm  # noqa: PLC0415

    ps = rt.global_process_set
    algo = get_algorithm(compression, hierarchical, ps, num_streams=num_streams, error_feedback=error_feedback)
    streams = rt.stream_groups(ps, num_streams)
    states = states if states is not None else [{} for _ in tensors]
    futs = [algo(t, ReduceContext(group=streams[b % num_streams], process_set=ps,
                                  postscale=1.0 if op_sum else 1.0 / ps.size(), bucket_index=b, state=states[b]))
            for b, t in enumerate(tensors)]
    for f in futs:
        f.wait()
    return tensors


def _reference(tensors: list, op_sum: bool = False) -> list:
    import torch.distributed as dist  # noqa: PLC0415

    out = []
    for t in tensors:
        r = t.double()
        dist.all_reduce(r)
        out.append(r if op_sum else r / dist.get_world_size())
    return out


def _compare_with_fp32(compression: str, hierarchical: str, sizes: tuple, chunk_nbytes: int = 64 * 1024,
                       device: str = "cpu"):
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.core.algorithms._levels as levels  # noqa: PLC0415

    levels.CHUNK_NBYTES = chunk_nbytes  # several chunks in flight with small tensors
    torch.set_num_threads(1)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    tensors = [(torch.randn(n, generator=g) * (1 + rank)).to(device) for n in sizes]
    refs = _reference(tensors)
    max_abs = [torch.tensor([t.abs().max().item()]) for t in tensors]
    for m in max_abs:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    outs = _reduce(compression, hierarchical, [t.clone() for t in tensors])
    errors = [float((o.double() - r).abs().max()) for o, r in zip(outs, refs)]
    tols = [_tolerance(compression, m.item()) for m in max_abs]
    return errors, tols, [o.tolist()[:50] + o.tolist()[-50:] for o in outs]


#: Below one chunk, odd (padding), and several 64 KB chunks (the pipeline), on 2 streams.
FLAT_SIZES = (1, 7, 1001, 5 * 16 * 1024 + 5)


@pytest.mark.parametrize("compression,world", [("fp16", 2), ("bf16", 2), ("fp16", 3), ("bf16", 3)])
def test_flat_16bit_equals_fp32_within_tolerance(compression, world):
    _check_flat_16bit(run_ranks(_compare_with_fp32, world_size=world, timeout_s=60,
                                args=(compression, "off", FLAT_SIZES)))


def _check_flat_16bit(results) -> None:
    """What :func:`_compare_with_fp32` must show (tests/gpu checks its CUDA runs with this too)."""
    for errors, tols, _ in results:
        for e, t in zip(errors, tols):
            assert e <= t, (errors, tols)
    # Every rank ends with the same bits (the owner rounds once, everyone gathers).
    assert all(r[2] == results[0][2] for r in results)


def _overflow(compression: str, hierarchical: str, op_sum: bool):
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    n = dist.get_world_size()
    x = torch.full((4096,), 60000.0)  # near float16's max (65504) on every rank
    x[1::2] = -59000.0
    out = _reduce(compression, hierarchical, [x.clone()], op_sum=op_sum)[0]
    expected = x * (n if op_sum else 1)
    return bool(torch.isfinite(out).all()), float(((out - expected).abs() / expected.abs()).max())


@pytest.mark.parametrize("op_sum", [False, True])
def test_values_near_fp16_max_do_not_overflow(op_sum):
    # Summed over 3 ranks in float16 these would be inf (180000 > 65504); scaled before the cast they
    # are not. The Sum is divided by 3 before and multiplied by 3 after, in float32.
    for finite, rel in run_ranks(_overflow, world_size=3, timeout_s=60, args=("fp16", "off", op_sum)):
        assert finite
        assert rel <= 2.01 * 2.0 ** -11


def _error_feedback(error_feedback: bool, steps: int):
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.rand(4099, generator=g) + 0.5  # the same gradient every step
    mean = _reference([x])[0]
    states = [{}]
    total = torch.zeros(4099, dtype=torch.float64)
    first_residual = None
    for step in range(steps):
        out = _reduce("fp16", "off", [x.clone()], error_feedback=error_feedback, states=states)[0]
        total += out.double()
        if step == 0 and error_feedback:
            res = states[0]["error_feedback"]["cast0"][:4099].clone()
            # What step 1's rounding dropped: x/n minus its float16 value. (With two ranks the whole
            # chunk travels and is rounded; with more, our own piece stays float32: nothing dropped.)
            v = x * (1.0 / n)  # the pre-scaling, as the algorithm does it (a multiply in float32)
            dropped = v - v.half().float()
            if n > 2:
                per = -(-4099 // n)
                dropped[rank * per:(rank + 1) * per] = 0.0
            first_residual = float((res - dropped).abs().max())
    err = float((total - steps * mean).abs().max())
    return err, first_residual, float(mean.abs().max())


@pytest.mark.parametrize("world", [2, 3])
def test_error_feedback_accumulates_what_was_dropped(world):
    steps = 40
    with_ef = run_ranks(_error_feedback, world_size=world, timeout_s=60, args=(True, steps))
    without = run_ranks(_error_feedback, world_size=world, timeout_s=60, args=(False, steps))
    for (err_ef, first_residual, scale), (err_plain, _, _) in zip(with_ef, without):
        # The residual after step 1 is exactly what rounding dropped.
        assert first_residual == 0.0
        # With feedback the sum over steps stays within a few roundings of the exact sum (the residual
        # carries at most one rounding per site); without it the error grows with the number of steps.
        assert err_ef <= 4 * 2.0 ** -11 * scale, (err_ef, err_plain)
        assert err_plain > 5 * err_ef, (err_ef, err_plain)


def _optimizer_run(compression: str, steps: int, device: str = "cpu"):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=getattr(hvd.Compression, compression),
                                   fusion_threshold_mb=0.005, first_bucket_mb=0.002)
    g = torch.Generator().manual_seed(hvd.rank())
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g).to(device), torch.randn(32, 4, generator=g).to(device)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach().cpu().clone() for p in model.parameters()], losses


_OPT_STEPS = 8
_OPT_ENV = {"SHOAL_LOCAL_SIZE": "1"}  # two "nodes": mixed compression uses 16 bits too


@functools.lru_cache(maxsize=1)
def _optimizer_reference():
    return run_ranks(_optimizer_run, world_size=2, timeout_s=60, args=("none", _OPT_STEPS), env=_OPT_ENV)


@pytest.mark.parametrize("compression", ["fp16", "bf16", "mixed_fp16"])
def test_distributed_optimizer_with_compression_trains_like_fp32(compression):
    ref = _optimizer_reference()
    got = run_ranks(_optimizer_run, world_size=2, timeout_s=60, args=(compression, _OPT_STEPS), env=_OPT_ENV)
    _check_compressed_training(compression, got, ref)


def _check_compressed_training(compression: str, got, ref) -> None:
    """A compressed run of :func:`_optimizer_run` against the fp32 one (tests/gpu: the same on CUDA)."""
    # Ranks agree bitwise; parameters stay within 16-bit rounding of the fp32 run (8 SGD steps, lr 0.1,
    # gradients ~0.1: a relative gradient error of 2u moves a parameter by far less than 1e-2).
    for a, b in zip(got[0][0], got[1][0]):
        assert torch.equal(a, b)
    tol = 1e-2 if "bf16" in compression else 2e-3
    for p, q in zip(got[0][0], ref[0][0]):
        assert (p - q).abs().max() <= tol
    assert abs(got[0][1][-1] - ref[0][1][-1]) <= 5 * tol


def _ddp(compression: str):
    import copy  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    local = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    state, hook = hvd.comm_hook(compression=getattr(hvd.Compression, compression), error_feedback=True)
    ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(hvd.rank())
    grads, local_max = [], 0.0
    for _ in range(2):
        x = torch.randn(16, 32, generator=g)
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        local.zero_grad()
        local(x).square().mean().backward()
        local_max = max(local_max, max(p.grad.abs().max().item() for p in local.parameters()))
    has_residuals = all("error_feedback" in st for st in state.bucket_state.values())
    return grads, len(state.bucket_state) if has_residuals else 0, local_max


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_ddp_comm_hook_with_compression(compression):
    ref = run_ranks(_ddp, world_size=2, timeout_s=60, args=("none",))
    got = run_ranks(_ddp, world_size=2, timeout_s=60, args=(compression,))
    # The module docstring's bound, with max_j |x_j| the largest local gradient of any rank (DDP
    # buckets mix parameters, so the bound is per bucket, not per parameter).
    tol = _tolerance(compression, max(r[2] for r in got))
    for step in range(2):
        for p, q in zip(got[0][0][step], ref[0][0][step]):
            assert (p - q).abs().max() <= tol
        for a, b in zip(got[0][0][step], got[1][0][step]):
            assert torch.equal(a, b)
    assert got[0][1] >= 1  # every bucket keeps its error-feedback residuals across steps


def _peer_dies():
    import os  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    x = torch.randn(1 << 20)
    _reduce("fp16", "off", [x.clone()])  # connections up
    if dist.get_rank() == 1:
        os._exit(3)
    try:
        _reduce("fp16", "off", [x.clone() for _ in range(3)])
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__
    return "no error"


def test_a_dead_peer_fails_the_compressed_allreduce_within_the_deadline():
    from shoal.testing import RanksFailed  # noqa: PLC0415

    with pytest.raises(RanksFailed) as info:
        run_ranks(_peer_dies, world_size=2, timeout_s=40, pg_timeout_s=10, grace_s=15)
    results = info.value.results
    assert results[1].status == "died"
    assert results[0].status == "ok" and results[0].value != "no error"
