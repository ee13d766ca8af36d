"""Overhead of the NaN/Inf gradient check: the same training with ``nan_check="off"`` and ``"raise"``.

The issue's rule: with no NaN present the check may cost at most 1% of the step time on the synthetic
benchmark models; then it is on by default with ``raise``. Both settings train their own copy of the
model (same seed, same batch) in the same processes, in interleaved rounds (off, on, off, on, ...), so
that a noisy neighbour hurts both alike. Two numbers per model:

* the step-time difference (median on / median off - 1): what a user sees, but noisy on a loaded machine;
* the check's own time inside the step, as a share of the step with the check on: the per-bucket
  checks ("checks ms") plus the one flag allreduce after the buckets ("flags ms"), timed on every rank,
  the slowest rank per step. A direct measurement, far less noisy.

Plus the micro-benchmark behind the choice of the per-bucket reduction (25 MB fp32 bucket, one thread).
``--bucket-sums`` (CPU) also times the earlier check, every bucket summed whole at launch, in the same
rounds ("raise_bucket"), beside the current one (large gradients summed part by part as they are loaded).

Launch (2 ranks on one host; the script starts them itself through shoal.testing.run_ranks)::

    python benchmarks/nan_check_bench.py
    python benchmarks/nan_check_bench.py --models mlp_big --rounds 6

or under a launcher: ``shoal run -np 2 python benchmarks/nan_check_bench.py``. On a GPU, ``--device cuda``
(or ``--cuda``) runs a world of one on NCCL (``op=Sum`` keeps the optimizer's reducer, and so the check,
active) with a fused SGD, timing 20 steps between synchronizations: a host sync per step would show there
(the check keeps its verdict on the device and the fused SGD skips on it; it adds none).
Results: a table on the console and JSON under ``benchmarks/results/<date>-nan_check.json`` (``--name``,
``--out`` change the name and the folder; scripts/gpu_check.sh writes ``<date>-gpu-nan_check.json``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Autotuner off in both settings: it would re-plan each copy's buckets on its own schedule (and through
#: measured step times, differently), and the comparison is about the check only. Set by the bench itself
#: (environment of the ranks it starts; ``init(autotune=False)`` under a launcher).
_ENV = {"SHOAL_AUTOTUNE": "0"}


def _micro(reps: int = 15) -> dict:
    """Milliseconds per call on a 25 MB fp32 bucket, and on a 64 MB gradient as it is loaded (median of
    ``reps``), one thread."""
    import torch  # noqa: PLC0415

    b = torch.randn(25 * 1024 * 1024 // 4)
    cases = {
        "sum (chosen on CPU)": lambda: bool(torch.isfinite(b.sum())),
        "isfinite(b).all()": lambda: bool(torch.isfinite(b).all()),
        "isnan(b).any()": lambda: bool(torch.isnan(b).any()),
        "amax": lambda: b.amax(),
        "foreach_norm(inf), 1 tensor": lambda: torch._foreach_norm([b], float("inf")),
        "mul_(1.0) (the postscale pass, reference)": lambda: b.mul_(1.0),
    }
    # The load pass the check rides on (shoal.core.reducer, constraint 8): a 64 MB gradient scaled into its
    # bucket, then summed whole (cold) or part by part right after each part is written (in the cache).
    g, view, part = torch.randn(16 << 20), torch.empty(16 << 20), 1 << 20

    def in_parts(check: bool):
        for i in range(0, g.numel(), part):
            p = view[i:i + part]
            torch.mul(g[i:i + part], 0.5, out=p)
            if check:
                p.sum()

    cases.update({
        "64 MB: scale into bucket (reference)": lambda: torch.mul(g, 0.5, out=view),
        "64 MB: scale, then sum whole": lambda: (torch.mul(g, 0.5, out=view), view.sum()),
        "64 MB: scale in 4 MB parts (reference)": lambda: in_parts(False),
        "64 MB: scale + sum in 4 MB parts (chosen)": lambda: in_parts(True),
    })
    ts: dict = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(reps):  # interleaved, so that a noisy neighbour hurts every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(t) * 1e3, 3) for name, t in ts.items()}


def _bench_rank(args: dict) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    import shoal.torch as sh  # noqa: PLC0415

    sys.path.insert(0, str(HERE))
    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    from shoal.core import runtime  # noqa: PLC0415

    torch.set_num_threads(1)
    sh.init(autotune=False)  # a no-op when run_ranks started this rank (it passed _ENV)
    assert not runtime.config().autotune, "the autotuner must be off in both settings"
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {"models": {}, "autotune": runtime.config().autotune}
    for name in args["models"]:
        spec = MODELS[name]
        x, y = synthetic_batch(name, spec.batch_size, seed=1 + rank)
        runs = {}
        for policy in ("off", "raise") + (("raise_bucket",) if args.get("bucket_sums") else ()):
            model = build_model(name, 0)
            opt = sh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                          named_parameters=model.named_parameters(),
                                          nan_check=policy.split("_")[0])
            runs[policy] = {"model": model, "opt": opt, "steps_s": [], "check_s": [], "flags_s": []}

        def one_step(run):
            run["opt"].zero_grad()
            loss = F.cross_entropy(run["model"](x), y)
            loss.backward()
            run["opt"].step()
            return loss

        for policy, run in runs.items():  # warm-up: step 1 discovers the order and builds the reducer
            for _ in range(args["warmup"]):
                one_step(run)
            if policy == "raise_bucket":  # the earlier check: every bucket summed whole at launch
                run["opt"]._owner._check.cache_parts = False
        for rnd in range(args["rounds"]):
            order = list(runs)[rnd % len(runs):] + list(runs)[:rnd % len(runs)]
            order = order if rnd % 2 == 0 else list(reversed(order))
            for policy in order:
                run = runs[policy]
                dist.barrier()
                for _ in range(args["steps"]):
                    before = run["opt"].engine.timings
                    t0 = time.perf_counter()
                    one_step(run)
                    run["steps_s"].append(time.perf_counter() - t0)
                    after = run["opt"].engine.timings  # the check's own clocks (opt.engine.timings)
                    run["check_s"].append(after["nan_check_s"] - before["nan_check_s"])
                    run["flags_s"].append(after["nan_combine_s"] - before["nan_combine_s"])
        everyone = [None] * world
        mine = {p: (r["steps_s"], r["check_s"], r["flags_s"]) for p, r in runs.items()}
        dist.all_gather_object(everyone, mine)
        res = {"params": sum(p.numel() for p in runs["off"]["model"].parameters()),
               "buckets": runs["raise"]["opt"].engine.num_buckets}
        for policy in runs:
            n = len(everyone[0][policy][0])
            step = [max(e[policy][0][i] for e in everyone) for i in range(n)]
            check = [max(e[policy][1][i] for e in everyone) for i in range(n)]
            flags = [max(e[policy][2][i] for e in everyone) for i in range(n)]
            res[policy] = {"median_step_ms": statistics.median(step) * 1e3,
                           "p10_step_ms": sorted(step)[n // 10] * 1e3,
                           "p90_step_ms": sorted(step)[n * 9 // 10] * 1e3,
                           "median_check_ms": statistics.median(check) * 1e3,
                           "median_flags_ms": statistics.median(flags) * 1e3}
        res["step_overhead_pct"] = 100 * (res["raise"]["median_step_ms"] / res["off"]["median_step_ms"] - 1)
        cost = res["raise"]["median_check_ms"] + res["raise"]["median_flags_ms"]
        res["check_pct_of_step"] = 100 * cost / res["raise"]["median_step_ms"]
        if "raise_bucket" in res:
            rb = res["raise_bucket"]
            rb_cost = rb["median_check_ms"] + rb["median_flags_ms"]
            res["bucket_sums_pct_of_step"] = 100 * rb_cost / rb["median_step_ms"]
        res["loadavg_after_model"] = _load()  # the machine may be shared: the load while this model ran
        out["models"][name] = res
    return out


def _bench_cuda(args: dict) -> dict:
    """World of one on NCCL: off vs raise, interleaved, per model and batch size."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    import shoal.torch as sh  # noqa: PLC0415

    sys.path.insert(0, str(HERE))
    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    sh.init(autotune=False)
    dev = torch.device("cuda")
    out = {"gpu": torch.cuda.get_device_name(), "models": {}, "autotune": False}
    for name in args["models"]:
        for batch in (MODELS[name].batch_size, 16 * MODELS[name].batch_size):
            x, y = (t.to(dev) for t in synthetic_batch(name, batch))
            runs = {}
            for policy in ("off", "raise"):
                model = build_model(name, 0).to(dev)
                # fused: the optimizer skips on the device, so the check adds no host sync (in both
                # settings, so that only the check differs; shoal.torch.optimizer, constraint 7).
                opt = sh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, fused=True), op="sum",
                                              named_parameters=model.named_parameters(), nan_check=policy)
                runs[policy] = (model, opt, [])

            def steps(model, opt, n):
                for _ in range(n):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()

            for model, opt, _ in runs.values():
                steps(model, opt, args["warmup"] + 3)
            for rnd in range(2 * args["rounds"]):
                for policy in (("off", "raise") if rnd % 2 == 0 else ("raise", "off")):
                    model, opt, times = runs[policy]
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    steps(model, opt, 20)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / 20)
            off, on = (statistics.median(runs[p][2]) * 1e3 for p in ("off", "raise"))
            out["models"][f"{name}/b{batch}"] = {
                "buckets": runs["raise"][1].engine.num_buckets, "off": {"median_step_ms": off},
                "raise": {"median_step_ms": on}, "step_overhead_pct": 100 * (on / off - 1)}
    return out


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp_big", "many_small", "cnn"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting per round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (off, on, on, off, ...)")
    ap.add_argument("--timeout-s", type=float, default=1200.0)
    ap.add_argument("--bucket-sums", action="store_true",
                    help="CPU: also time the earlier check (each bucket summed whole at launch) in the same "
                         "rounds: 'raise_bucket' beside 'raise'")
    ap.add_argument("--micro-reps", type=int, default=15, help="repetitions of the 25 MB micro-benchmark")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: 2 gloo ranks (default); cuda: a world of one on the GPU (NCCL)")
    ap.add_argument("--cuda", action="store_true", help="the same as --device cuda")
    ap.add_argument("--name", default=None, help="results name (default nan_check, or nan_check-cuda)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.cuda = args.cuda or args.device == "cuda"
    import torch  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from shoal.core.env import get_env  # noqa: PLC0415
    from shoal.testing import run_ranks  # noqa: PLC0415

    if args.cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False. HINT: run it on a GPU machine with a CUDA "
                 "build of torch (`shoal doctor` says what this one has), or use --device cpu")
    console = Console()
    load_before = _load()
    cfg = {"models": args.models, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
           "bucket_sums": args.bucket_sums}
    torch.set_num_threads(1)
    micro = _micro(args.micro_reps)
    if args.cuda:
        world = 1
        result = _bench_cuda(cfg)
    elif get_env("RANK") is not None:  # under a launcher: this process is one rank
        result = _bench_rank(cfg)
        import torch.distributed as dist  # noqa: PLC0415
        if dist.get_rank() != 0:
            return 0
        world = dist.get_world_size()
    else:
        world = 2
        result = run_ranks(_bench_rank, world_size=world, timeout_s=args.timeout_s, args=(cfg,), env=_ENV)[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "hardware": {"cpu": cpu, "cores": os.cpu_count()}, "torch": torch.__version__,
              "world_size": world, "device": "cuda" if args.cuda else "cpu", "threads_per_rank": 1, "settings": cfg,
              "loadavg_before": load_before, "loadavg_after": _load(),
              "micro_25mb_bucket_ms": micro, **result}
    console.print(f"[bold]NaN check overhead[/]  {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; "
                  f"world size {world}; autotune off; load average before {load_before}, after "
                  f"{report['loadavg_after']}")
    mt = Table(title="one 25 MB fp32 bucket / one 64 MB gradient, one thread (median ms)")
    mt.add_column("reduction")
    mt.add_column("ms", justify="right")
    for k, v in micro.items():
        mt.add_row(k, f"{v:.2f}")
    console.print(mt)
    t = Table(title="step time, check off vs on (raise), interleaved; slowest rank per step")
    for col in ("model", "buckets", "off ms", "on ms", "on/off - 1", "checks ms", "flags ms", "% of step"):
        t.add_column(col, justify="left" if col == "model" else "right")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for name, r in result["models"].items():
        t.add_row(name, str(r["buckets"]), f"{r['off']['median_step_ms']:.1f}",
                  f"{r['raise']['median_step_ms']:.1f}", f"{r['step_overhead_pct']:+.2f}%",
                  fmt(r["raise"].get("median_check_ms"), ".2f"), fmt(r["raise"].get("median_flags_ms"), ".2f"),
                  fmt(r.get("check_pct_of_step"), ".2f"))
        if "raise_bucket" in r:
            rb = r["raise_bucket"]
            t.add_row(f"{name} (whole buckets)", "", "", f"{rb['median_step_ms']:.1f}",
                      f"{100 * (rb['median_step_ms'] / r['off']['median_step_ms'] - 1):+.2f}%",
                      f"{rb['median_check_ms']:.2f}", f"{rb['median_flags_ms']:.2f}",
                      f"{r['bucket_sums_pct_of_step']:.2f}")
    console.print(t)
    from _results import save_report  # noqa: PLC0415

    path = save_report(report, args.name or f"nan_check{'-cuda' if args.cuda else ''}", args.out)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
