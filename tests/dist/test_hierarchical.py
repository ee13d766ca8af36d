"""Hierarchical allreduce on real gloo ranks, nodes emulated with SHOAL_LOCAL_SIZE (and once in the
emulated cluster): equals the flat allreduce, falls back on uneven layouts, composes with compression.

Exactness. Float32 sums in another order differ by rounding, so the float32 comparisons use integer-valued
data (|x| <= 1000, sums of a few ranks exact in float32): hierarchical must then equal flat bitwise. With
random normals the difference is a few float32 roundings: <= 4 * 2**-24 * sum_j |x_j| per element.
16-bit modes: the bound of tests/dist/test_compressed_allreduce.py (2.01 u max_j |x_j|) plus, in
``fp16`` mode, the rounding of the node's partial sum before it crosses (one more u * max_j |x_j| * G/n).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shoal.testing import run_ranks
from shoal.testing.cluster import EmulatedCluster, check_available

_U = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "mixed_fp16": 2.0 ** -11, "mixed_bf16": 2.0 ** -8}


def _data(rank: int, sizes, integer: bool):
    g = torch.Generator().manual_seed(10 + rank)
    if integer:
        return [torch.randint(-1000, 1001, (n,), generator=g).float() for n in sizes]
    return [torch.randn(n, generator=g) for n in sizes]


def _run(compression: str, hierarchical: str, tensors, num_streams: int = 2, op_sum: bool = True):
    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, allreduce_flat, get_algorithm  # noqa: PLC0415

    ps = rt.global_process_set
    algo = get_algorithm(compression, hierarchical, ps, num_streams=num_streams)
    streams = rt.stream_groups(ps, num_streams)
    futs = [algo(t, ReduceContext(group=streams[b % num_streams], process_set=ps,
                                  postscale=1.0 if op_sum else 1.0 / ps.size(), bucket_index=b))
            for b, t in enumerate(tensors)]
    for f in futs:
        f.wait()
    return tensors, algo is allreduce_flat


def _versus_flat(compression: str, integer: bool, chunk_nbytes: int = 64 * 1024, device: str = "cpu"):
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.core.algorithms._levels as levels  # noqa: PLC0415
    import shoal.core.runtime as rt  # noqa: PLC0415

    levels.CHUNK_NBYTES = chunk_nbytes  # several chunks in flight with small tensors
    torch.set_num_threads(1)
    sizes = (1, 5, 999, 5 * 16 * 1024 + 3)
    data = [t.to(device) for t in _data(rt.rank(), sizes, integer)]
    flat, _ = _run("none", "off", [t.clone() for t in data])
    hier, fell_back = _run(compression, "on", [t.clone() for t in data])
    bound = []
    for t in data:
        s = t.abs().double()
        m = torch.tensor([t.abs().max().item()])
        dist.all_reduce(s)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        bound.append((s, m.item()))
    diffs = [float((h.double() - f.double()).abs().max()) for h, f in zip(hier, flat)]
    fp32_ok = all(bool(((h.double() - f.double()).abs() <= 4 * 2.0 ** -24 * s + 1e-30).all())
                  for h, f, (s, _) in zip(hier, flat, bound))
    exact = all(torch.equal(h, f) for h, f in zip(hier, flat))
    return {"diffs": diffs, "max_abs": [m for _, m in bound], "exact": exact, "fp32_ok": fp32_ok,
            "fell_back": fell_back, "layout": [list(n) for n in rt.layout().nodes],
            "head": [h[:64].tolist() + h[-64:].tolist() for h in hier]}


@pytest.mark.parametrize("world,local_size", [(4, 2), (6, 2), (6, 3)])
def test_hierarchical_fp32_equals_flat(world, local_size):
    # 2x2, 3x2, 2x3 layouts; integer-valued data: bitwise equal to the flat allreduce.
    results = run_ranks(_versus_flat, world_size=world, timeout_s=60, args=("none", True),
                        env={"SHOAL_LOCAL_SIZE": str(local_size)})
    for r in results:
        assert not r["fell_back"] and r["exact"], r["diffs"]
    assert len(results[0]["layout"]) == world // local_size


def test_hierarchical_fp32_random_within_rounding_of_flat():
    for r in run_ranks(_versus_flat, world_size=6, timeout_s=60, args=("none", False),
                       env={"SHOAL_LOCAL_SIZE": "2"}):
        assert r["fp32_ok"], r["diffs"]


@pytest.mark.parametrize("world,local_size", [(3, 2), (5, 3)])
def test_uneven_layouts_fall_back_to_flat(world, local_size):
    # Nodes of different sizes (e.g. 2 + 1): hierarchical=on uses the flat allreduce, same bits.
    results = run_ranks(_versus_flat, world_size=world, timeout_s=60, args=("none", True),
                        env={"SHOAL_LOCAL_SIZE": str(local_size)})
    for r in results:
        assert r["fell_back"] and r["exact"]


@pytest.mark.parametrize("compression,world", [("mixed_fp16", 4), ("fp16", 4), ("mixed_bf16", 4),
                                               ("mixed_fp16", 6), ("fp16", 6)])
def test_hierarchical_with_compression_within_16bit_tolerance(compression, world):
    # 2 nodes (the cross level is one exchange) and 3 nodes (reduce-scatter + allgather across nodes).
    results = run_ranks(_versus_flat, world_size=world, timeout_s=60, args=(compression, False),
                        env={"SHOAL_LOCAL_SIZE": "2"})
    _check_compressed_versus_flat(compression, world, results)


def _check_compressed_versus_flat(compression: str, world: int, results) -> None:
    """What :func:`_versus_flat` must show with 16 bits on the wire (tests/gpu: the same on CUDA)."""
    # Sum over n ranks (op_sum): 16-bit values are divided by n before the cast and multiplied after,
    # so the absolute bound scales with n; "fp16" rounds the node's partial sum once more.
    u, n = _U[compression], world
    extra = 1.0 if compression == "fp16" else 0.0
    for r in results:
        assert not r["fell_back"]
        for d, m in zip(r["diffs"], r["max_abs"]):
            assert d <= (2.01 + extra) * u * m * n + 2.0 ** -20, (r["diffs"], r["max_abs"])
    assert all(r["head"] == results[0]["head"] for r in results)  # same bits on every rank


def _decisions():
    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import use_hierarchical  # noqa: PLC0415

    ps = rt.global_process_set
    sub = rt.add_process_set([0, 1])
    return {s: use_hierarchical(s, ps) for s in ("auto", "on", "off")}, use_hierarchical("on", sub)


@pytest.mark.parametrize("world,local_size,auto,on", [
    (4, "2", True, True),    # 2 nodes x 2: auto on
    (4, "4", False, True),   # one node: auto off; on is allowed (degenerate, = flat)
    (4, "1", False, True),   # one rank per node: nothing to reduce inside a node
    (3, "2", False, False),  # uneven: never
])
def test_auto_on_off_rules(world, local_size, auto, on):
    for decided, on_subset in run_ranks(_decisions, world_size=world, timeout_s=60,
                                        env={"SHOAL_LOCAL_SIZE": local_size}):
        assert decided == {"auto": auto, "on": on, "off": False}
        assert on_subset is False  # a process set that is not the world: flat


def _optimizer(hierarchical: str, compression: str):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), hierarchical=hierarchical,
                                   compression=getattr(hvd.Compression, compression),
                                   fusion_threshold_mb=0.002, first_bucket_mb=0.001)
    g = torch.Generator().manual_seed(hvd.rank())
    for _ in range(3):
        x = torch.randint(-4, 5, (8, 8), generator=g).float()
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_distributed_optimizer_hierarchical_equals_flat():
    env = {"SHOAL_LOCAL_SIZE": "2"}
    flat = run_ranks(_optimizer, world_size=4, timeout_s=60, args=("off", "none"), env=env)
    hier = run_ranks(_optimizer, world_size=4, timeout_s=60, args=("on", "none"), env=env)
    mixed = run_ranks(_optimizer, world_size=4, timeout_s=60, args=("auto", "mixed_fp16"), env=env)
    for f, h, m in zip(flat, hier, mixed):
        for a, b, c in zip(f, h, m):
            # Gradients differ only by float32 summation order: a few ulps after 3 SGD steps.
            assert (a - b).abs().max() <= 1e-5
            assert (a - c).abs().max() <= 1e-2
    assert all(torch.equal(a, b) for a, b in zip(mixed[0], mixed[3]))


def _ddp(hierarchical: str, compression: str):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(*hvd.comm_hook(hierarchical=hierarchical,
                                          compression=getattr(hvd.Compression, compression)))
    x = torch.randint(-3, 4, (8, 16), generator=torch.Generator().manual_seed(hvd.rank())).float()
    ddp(x).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_ddp_comm_hook_hierarchical():
    env = {"SHOAL_LOCAL_SIZE": "2"}
    flat = run_ranks(_ddp, world_size=4, timeout_s=60, args=("off", "none"), env=env)
    hier = run_ranks(_ddp, world_size=4, timeout_s=60, args=("on", "mixed_fp16"), env=env)
    for f, h in zip(flat, hier):
        for a, b in zip(f, h):
            assert (a - b).abs().max() <= 4 * 2.0 ** -11 * max(1.0, a.abs().max().item())


def _user_allreduce(hierarchical: str):
    import shoal.core.algorithms as algorithms  # noqa: PLC0415
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(hvd.rank())
    big = torch.randint(-1000, 1001, (1 << 19,), generator=g).float()  # 2 MiB: hierarchical when on
    small = torch.randint(-1000, 1001, (1000,), generator=g).float()
    out = [hvd.allreduce(big, op=hvd.Sum), hvd.allreduce(small, op=hvd.Average),
           hvd.synchronize(hvd.allreduce_async(big, op=hvd.Average))]
    used = [a is not None for a in algorithms._user_algorithms.values()]
    return out, used


def test_user_allreduce_takes_the_hierarchical_path():
    env = {"SHOAL_LOCAL_SIZE": "2"}
    flat = run_ranks(_user_allreduce, world_size=4, timeout_s=60, args=("off",),
                     env={**env, "SHOAL_HIERARCHICAL": "off"})
    hier = run_ranks(_user_allreduce, world_size=4, timeout_s=60, args=("auto",), env=env)
    for (f, used_f), (h, used_h) in zip(flat, hier):
        assert used_f == [False] and used_h == [True]
        for a, b in zip(f, h):
            assert torch.equal(a, b)  # integer-valued data: exact in any summation order


_CLUSTER_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    import shoal.core.runtime as rt
    from shoal.core.algorithms import ReduceContext, get_algorithm
    torch.set_num_threads(1)
    rt.init(timeout_s=60)
    assert (rt.local_size(), rt.cross_size()) == (2, 2), rt.layout()
    ps = rt.global_process_set
    g = torch.Generator().manual_seed(rt.rank())
    x = torch.randint(-1000, 1001, (300_001,), generator=g).float()
    out = {}
    for name, comp, hier in [("flat", "none", "off"), ("hier", "none", "auto"), ("mixed", "mixed_fp16", "auto")]:
        algo = get_algorithm(comp, hier, ps, num_streams=2)
        y = x.clone()
        algo(y, ReduceContext(group=rt.stream_groups(ps, 2)[0], process_set=ps)).wait()
        out[name] = y
    assert torch.equal(out["hier"], out["flat"])
    bound = 2.01 * 2.0 ** -11 * 1000 * 4
    assert (out["mixed"] - out["flat"]).abs().max() <= bound
    print("CLUSTER-OK", rt.rank(), flush=True)
    rt.shutdown()
""")


@pytest.mark.skipif(check_available() is not None, reason=f"emulated cluster unavailable: {check_available()}")
@pytest.mark.timeout(120)
def test_hierarchical_on_the_emulated_cluster():
    # Real nodes: 2 network namespaces x 2 ranks, host names per node, an unshaped link between them.
    with EmulatedCluster(nodes=2, ranks_per_node=2, rate=None) as cluster:
        run = cluster.run([sys.executable, "-c", _CLUSTER_SCRIPT], timeout_s=90)
    run.check()
    assert all("CLUSTER-OK" in r.output for r in run.results)


def test_benchmark_script_runs_on_loopback():
    # The benchmark (benchmarks/allreduce_bench.py) stays runnable: a tiny 2x2 run, every mode.
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "allreduce_bench.py"), "--layout", "2x2", "--size-mb", "0.5",
           "--rounds", "1", "--modes", "flat_fp16", "hier", "hier_fp16", "hier_mixed", "--no-save",
           "--timeout-s", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # kill the launcher and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert "hier_mixed" in out and "vs flat" in out
