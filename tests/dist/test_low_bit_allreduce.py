"""Compression below 16 bits on real gloo ranks: PowerSGD against a single-process implementation of the same
rounds, 8 bits against the float64 mean and its error feedback's running sum, both through the optimizer
(negotiation, NaN check, timeline, the tuner's re-planning, a parameter mismatch) and the DDP hook.

Tolerances (written out).

* PowerSGD: the reference runs the same rounds in float64 in one process (every rank's gradients, the
  same first Q). The engine's float32 matmuls, QR and sums differ from it by rounding only: measured
  <= 1e-6 of the largest output value over 6 steps; allowed 1e-5. QR's column signs may differ between
  the two and do not matter: P Q^T with Q = D^T P is the same for either sign.
* 8 bits, one step: every value is rounded at most three times (its contribution, a node's partial sum
  before it crosses, the owner's sum), each time by at most half a quantum, and no quantum exceeds
  M / 127 where M bounds every partial sum (the mean of values of magnitude <= max_j |x_j| = M after
  pre-scaling by 1/n): |result - mean| <= 3 * M / 254.
* 8 bits, error feedback over T steps on two ranks: the running sum of the results differs from the running
  sum of the means by the two ranks' last residuals, each at most half its quantum: one quantum
  (M / n + half a quantum carried) / 127 at most.
"""

from __future__ import annotations

import functools

import pytest
import torch

from shoal.testing import run_ranks

# A bucket as the reducer lays it out: two matrices, a vector, a conv weight, a matrix too small to
# gain, 64-byte alignment between tensors, and a tail of 16 after the last one (the negotiation's slot).
_SHAPES = [(64, 96), (33,), (40, 3, 3, 3), (5, 4), (96, 64)]


def _layout():
    off, out = 0, []
    for s in _SHAPES:
        out.append((off, s))
        off += (torch.Size(s).numel() + 15) // 16 * 16
    return out, off + 16


def _grads(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in _SHAPES]


def _powersgd_rank(compression: str, hierarchical: str, steps: int, r: int, start: int):
    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, get_algorithm  # noqa: PLC0415

    torch.set_num_threads(1)
    ps = rt.global_process_set
    algo = get_algorithm(f"{compression}:rank={r},start_step={start}", hierarchical, ps, num_streams=1)
    stream = rt.stream_groups(ps, 1)[0]
    lay, numel = _layout()
    state: dict = {}
    outs = []
    for step in range(1, steps + 1):
        buf = torch.zeros(numel)
        for (off, _), g in zip(lay, _grads(rt.rank(), step)):
            buf[off:off + g.numel()] = g.reshape(-1)
        buf[-16:] = 1.0 if rt.rank() == 0 else 0.0  # a flag only rank 0 raises: must survive exactly
        ctx = ReduceContext(group=stream, process_set=ps, postscale=1 / ps.size(), state=state, step=step,
                            layout=lambda: lay)
        algo(buf, ctx).wait()
        outs.append([buf[off:off + torch.Size(s).numel()].view(s).clone() for off, s in lay] + [buf[-16:].clone()])
    return outs


def _powersgd_reference(world: int, local: int, steps: int, r: int, start: int, mixed: bool):
    """The rounds of shoal.core.algorithms.powersgd in float64, one process, every rank's gradients."""
    from shoal.core.algorithms.powersgd import SEED, plan_matrices  # noqa: PLC0415

    lay, numel = _layout()
    mats, _ = plan_matrices(numel, lay, r)
    ids = [i for i, (off, _) in enumerate(lay) if any(m.offset == off for m in mats)]
    q0 = torch.randn(sum(m.cols for m in mats) * r, generator=torch.Generator().manual_seed(SEED)).double()
    qt, pos = {}, 0
    for i, m in zip(ids, mats):  # the documented first Q: one seeded draw, matrices in bucket order
        qt[i] = q0[pos:pos + m.cols * r].view(r, m.cols).clone()
        pos += m.cols * r
    members = list(range(world // local)) if mixed else list(range(world))
    err = {(w, i): 0.0 for w in members for i in ids}
    outs = []
    for step in range(1, steps + 1):
        gs = [[g.double() for g in _grads(w, step)] for w in range(world)]
        if mixed:  # full precision inside each node first, then the rounds across nodes
            gs = [[sum(gs[n * local + j][i] for j in range(local)) for i in range(len(_SHAPES))] for n in members]
        out = []
        for i, s in enumerate(_SHAPES):
            if step <= start or i not in ids:
                out.append(sum(g[i] for g in gs) / world)
                continue
            d = {w: gs[w][i].reshape(s[0], -1) + err[(w, i)] for w in members}
            p = torch.linalg.qr(sum(d[w] @ qt[i].t() for w in members)).Q
            qw = {w: p.t() @ d[w] for w in members}
            for w in members:
                err[(w, i)] = d[w] - p @ qw[w]
            qt[i] = sum(qw.values()) / world
            out.append((p @ qt[i]).view(s))
        outs.append(out)
    return outs


@pytest.mark.parametrize("compression,hierarchical,world,local", [
    ("powersgd", "off", 2, 1), ("powersgd", "off", 3, 1), ("mixed_powersgd", "on", 4, 2)])
def test_powersgd_equals_a_single_process_implementation_of_the_same_rounds(compression, hierarchical,
                                                                            world, local):
    steps, r, start = 6, 2, 2
    got = run_ranks(_powersgd_rank, world_size=world, timeout_s=60, args=(compression, hierarchical, steps, r, start),
                    env={"SHOAL_LOCAL_SIZE": str(local)})
    ref = _powersgd_reference(world, local, steps, r, start, mixed=compression.startswith("mixed"))
    for t in range(steps):
        for o, q in zip(got[0][t], ref[t]):
            err = float((o.double() - q).abs().max())
            assert err <= 1e-5 * float(q.abs().max()), (t, err, float(q.abs().max()))
        assert torch.equal(got[0][t][-1], torch.full((16,), 1.0 / world))  # the tail: exact
        for other in got[1:]:  # every rank ends with the same bits
            assert all(torch.equal(a, b) for a, b in zip(got[0][t], other[t]))
    # After the warm-up a compressed matrix is what its factors make it: rank <= r.
    assert int(torch.linalg.matrix_rank(got[0][-1][0].double(), rtol=1e-5)) <= r


def _int8_rank(compression: str, hierarchical: str):
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.core.algorithms._levels as levels  # noqa: PLC0415
    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, get_algorithm  # noqa: PLC0415

    levels.CHUNK_NBYTES = 64 * 1024  # several chunks in flight with small tensors
    torch.set_num_threads(1)
    ps = rt.global_process_set
    algo = get_algorithm(compression, hierarchical, ps, num_streams=2)
    streams = rt.stream_groups(ps, 2)
    g = torch.Generator().manual_seed(rt.rank())
    data = [torch.randn(n, generator=g) * (1 + rt.rank()) for n in (1, 7, 1001, 5 * 16 * 1024 + 5)]
    errors, bounds = [], []
    outs = [t.clone() for t in data]
    futs = [algo(t, ReduceContext(group=streams[b % 2], process_set=ps, postscale=1 / ps.size(), bucket_index=b))
            for b, t in enumerate(outs)]
    for f, t, o in zip(futs, data, outs):
        f.wait()
        mean = t.double()
        dist.all_reduce(mean)
        m = torch.tensor([float(t.abs().max())])
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        errors.append(float((o.double() - mean / ps.size()).abs().max()))
        bounds.append(3 * m.item() / 254)
    return errors, bounds, [o[:64].tolist() + o[-64:].tolist() for o in outs]


@pytest.mark.parametrize("compression,hierarchical,world,local", [
    ("int8", "off", 2, 1), ("int8", "off", 3, 1), ("mixed_int8", "on", 4, 2), ("int8", "on", 6, 2)])
def test_int8_equals_the_mean_within_three_half_quanta(compression, hierarchical, world, local):
    # Flat over 2 ranks (one exchange) and 3 (reduce-scatter, owner's sum, allgather); 2 x 2 with full
    # precision inside the node (the benchmark's layout); 3 nodes x 2 with 8 bits on both levels.
    results = run_ranks(_int8_rank, world_size=world, timeout_s=60, args=(compression, hierarchical),
                        env={"SHOAL_LOCAL_SIZE": str(local)})
    for errors, bounds, _ in results:
        assert all(e <= b for e, b in zip(errors, bounds)), (errors, bounds)
    assert all(r[2] == results[0][2] for r in results)  # the same bits on every rank


def _int8_feedback(steps: int):
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, get_algorithm  # noqa: PLC0415

    torch.set_num_threads(1)
    ps = rt.global_process_set
    n = ps.size()
    algo = get_algorithm("int8", "off", ps, num_streams=1)
    stream = rt.stream_groups(ps, 1)[0]
    x = torch.rand(4099, generator=torch.Generator().manual_seed(7 + rt.rank())) + 0.5  # the same every step
    mean = x.double()
    dist.all_reduce(mean)
    mean /= n
    state: dict = {}
    total = torch.zeros(4099, dtype=torch.float64)
    first = None
    for _ in range(steps):
        out = x.clone()
        algo(out, ReduceContext(group=stream, process_set=ps, postscale=1 / n, state=state)).wait()
        total += out.double()
        if first is None:
            first = float((out.double() - mean).abs().max())
    m = torch.tensor([float(x.abs().max())])
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    quantum = (m.item() / n) / 127 * (1 + 1 / 254)
    return float((total - steps * mean).abs().max()), first, quantum


def test_int8_error_feedback_keeps_the_running_sum_within_one_quantum():
    steps = 30
    for err, first, quantum in run_ranks(_int8_feedback, world_size=2, timeout_s=60, args=(steps,)):
        assert err <= quantum * (1 + 1e-4), (err, quantum)
        assert steps * first > 5 * err  # without feedback one step's rounding would repeat every step


# ------------------------------------------------------------------------------- through the frontends
class _Branchy(torch.nn.Module):
    """A trunk (a matrix PowerSGD compresses) and two heads; rank 1 uses head 1 until step 8, then head 0:
    after the model went static, a deviation only the negotiation's control slot can carry."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(48, 64)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(64, 3) for _ in range(2)])

    def forward(self, x, head: int):
        return self.heads[head](torch.tanh(self.trunk(x)))


def _train(compression: str, steps: int, nan_at: int = -1):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    model = _Branchy()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=compression)
    rank = hvd.rank()
    trace, losses, skipped = [], [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 48, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, 0 if rank == 0 or step >= 8 else 1), y)
        loss.backward()
        if step == nan_at and rank == 1:
            model.trunk.weight.grad[3, 5] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        skipped.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
        trace.append(opt.engine.negotiation["negotiations"])
        losses.append(loss.item())
    return {"params": [p.detach().clone() for p in model.parameters()], "trace": trace, "losses": losses,
            "skipped": skipped, "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


_TRAIN_STEPS = 12
_TRAIN_ENV = {"SHOAL_LOCAL_SIZE": "1", "SHOAL_AUTOTUNE": "0"}  # two "nodes": mixed compresses too


@functools.lru_cache(maxsize=1)
def _train_reference():
    return run_ranks(_train, world_size=2, timeout_s=60, args=("none", _TRAIN_STEPS), env=_TRAIN_ENV)


@pytest.mark.parametrize("compression", ["int8", "powersgd:rank=2,start_step=3", "mixed_int8"])
def test_optimizer_negotiation_and_accuracy_with_low_bits(compression):
    ref = _train_reference()
    got = run_ranks(_train, world_size=2, timeout_s=60, args=(compression, _TRAIN_STEPS), env=_TRAIN_ENV)
    assert all(torch.equal(a, b) for a, b in zip(got[0]["params"], got[1]["params"]))  # ranks agree bitwise
    # The negotiation sees what it sees in full precision: static from step 6, rank 1's deviation at step 8
    # found through the control slot (which travels exactly, not in a block scaled by gradients).
    assert got[0]["trace"] == ref[0]["trace"], (got[0]["trace"], ref[0]["trace"])
    assert ref[0]["trace"][8] == ref[0]["trace"][7] + 1
    # 12 SGD steps: 8 bits stay within a few quanta of fp32 (gradients ~0.1, lr 0.05); PowerSGD at rank 2
    # is a different algorithm after step 3 (equal before), the loss still falls.
    diff = max(float((p - q).abs().max()) for p, q in zip(got[0]["params"], ref[0]["params"]))
    if compression.startswith("powersgd"):
        assert got[0]["losses"][:4] == ref[0]["losses"][:4]
        assert sum(got[0]["losses"][-3:]) < sum(got[0]["losses"][:3])
    else:
        assert diff <= 2e-3, diff


@pytest.mark.parametrize("compression", ["int8", "powersgd:rank=2,start_step=1"])
def test_nan_skip_restarts_the_compression_state(compression):
    env = {"SHOAL_NAN_CHECK": "skip", "SHOAL_AUTOTUNE": "0"}
    got = run_ranks(_train, world_size=2, timeout_s=60, args=(compression, 6, 3), env=env)
    for r in got:
        # Step 4 (index 3) is skipped on both ranks; later steps train on finite values again: the NaN
        # went into the step's compression state (residual, Q), which restarted instead of carrying it.
        assert r["skipped"] == [False, False, False, True, False, False], r["skipped"]
        assert r["finite"]
    assert all(torch.equal(a, b) for a, b in zip(got[0]["params"], got[1]["params"]))


def _timeline(compression: str):
    import json  # noqa: PLC0415

    from shoal.core import timeline  # noqa: PLC0415

    _train(compression, 4)
    with open(timeline.stop_timeline()) as f:
        return sorted({(e.get("cat"), e.get("name")) for e in json.load(f)["traceEvents"]
                       if e.get("cat") in ("compression", "decompression")})


def test_timeline_shows_the_compression_work(tmp_path):
    env = {"SHOAL_TIMELINE_FILENAME": str(tmp_path / "tl.json"), "SHOAL_AUTOTUNE": "0"}
    names = run_ranks(_timeline, world_size=2, timeout_s=60, args=("powersgd:rank=2,start_step=1",), env=env)[0]
    assert ("compression", "powersgd P") in names and ("decompression", "powersgd P Q^T") in names, names
    names = run_ranks(_timeline, world_size=2, timeout_s=60, args=("int8",), env=env)[0]
    assert ("compression", "encode int8") in names, names


def _tuned(compression: str, steps: int):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(12):  # 3 MB of gradients in 24 tensors: the tuner's 1/2/4 MB buckets plan differently
        layers += [torch.nn.Linear(256, 256), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=compression)
    g = torch.Generator().manual_seed(100 + hvd.rank())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(16, 256, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return {"params": [p.detach().clone() for p in model.parameters()], "summary": opt.engine.autotune,
            "losses": losses, "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("compression", ["int8", "powersgd:rank=2,start_step=3"])
def test_the_tuner_replans_buckets_under_low_bits(compression):
    # The tuner tries bucket plans while the step runs compressed: each new plan restarts the buckets'
    # state (residuals, Q), and the ranks must still agree bitwise and keep training.
    got = run_ranks(_tuned, world_size=2, timeout_s=180, args=(compression, 55))
    assert all(torch.equal(a, b) for a, b in zip(got[0]["params"], got[1]["params"]))
    s0, s1 = got[0]["summary"], got[1]["summary"]
    assert s0["state"] == "settled" and s0["choice"] == s1["choice"] and s0["trials"] == s1["trials"]
    assert len({t["bucket_mb"] for t in s0["trials"]}) >= 2, s0["trials"]  # the plan really changed
    assert got[0]["finite"]
    assert sum(got[0]["losses"][-5:]) < sum(got[0]["losses"][:5]), got[0]["losses"]


def _mismatch():
    import shoal.torch as hvd  # noqa: PLC0415

    model = torch.nn.Linear(8, 8)
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=model.named_parameters(),
                                 compression=hvd.Compression.powersgd(rank=2 + 2 * hvd.rank()))
    except hvd.MismatchError as exc:
        return str(exc)
    return "no error"


def test_ranks_with_different_powersgd_parameters_fail_at_registration():
    for msg in run_ranks(_mismatch, world_size=2, timeout_s=60):
        assert "compression" in msg and "powersgd:rank=2" in msg and "rank 1: powersgd" in msg, msg


def _ddp(compression: str, steps: int):
    import copy  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.01)
    state, hook = hvd.comm_hook(compression=compression)
    ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(hvd.rank())
    grads, local_max = [], 0.0
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        grads.append([p.grad.clone() for p in ddp.parameters()])
        model.zero_grad()
        model(x).square().mean().backward()  # this rank's own gradient, for the 8-bit bound
        local_max = max(local_max, max(float(p.grad.abs().max()) for p in model.parameters()))
    return grads, state.steps, local_max


def test_ddp_comm_hook_with_powersgd_and_int8():
    steps = 4
    ref = [r[0] for r in run_ranks(_ddp, world_size=2, timeout_s=60, args=("none", steps))]
    psgd = run_ranks(_ddp, world_size=2, timeout_s=60, args=("powersgd:rank=2,start_step=2", steps))
    int8 = run_ranks(_ddp, world_size=2, timeout_s=60, args=("int8", steps))
    for got in (psgd, int8):
        assert got[0][1] == steps  # the hook counted the steps (PowerSGD's warm-up)
        for t in range(steps):
            assert all(torch.equal(a, b) for a, b in zip(got[0][0][t], got[1][0][t]))  # ranks agree
    for t in range(2):  # the warm-up steps are the full-precision sum
        assert all(torch.equal(a, b) for a, b in zip(psgd[0][0][t], ref[0][t]))
    weight = psgd[0][0][-1][0]  # the first Linear's weight after the warm-up: rank <= 2
    assert int(torch.linalg.matrix_rank(weight.double(), rtol=1e-5)) <= 2
    assert not torch.equal(weight, ref[0][-1][0])
    m = max(r[2] for r in int8)  # the module docstring's M: DDP's buckets mix parameters, so per bucket
    for a, b in zip(int8[0][0][-1], ref[0][-1]):
        assert float((a - b).abs().max()) <= 3 * m / 254
