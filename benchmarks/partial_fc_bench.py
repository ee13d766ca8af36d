"""PartialFC benchmark: classifier memory per rank and step time against a data-parallel full classifier.

Two measurements, each in real gloo ranks started by ``shoal.testing.run_ranks`` (so one command runs all):

1. Memory per rank of the classifier (weight + gradient + SGD-momentum state), at 1, 2 and 3 ranks,
   computed from the tensors' sizes: the sharded classifier shrinks as 1/N, the data-parallel one stays
   whole on every rank.
2. Step time at ``--classes`` x ``--dim`` (default 1M x 128) on 2 ranks, modes interleaved round by round
   (a noisy neighbour hurts them alike), median after warm-up of the slowest rank's step time:

       dp_full        every rank holds the whole weight, computes the margin softmax of its local batch with
                      plain torch ops (F.normalize, F.cross_entropy) and allreduces (averages) the weight
                      gradient: plain data parallelism of the classifier
       dp_full_fused  the same, with PartialFC's kernels (fused normalize backward, in-place softmax
                      backward) on the whole weight: pfc vs this one is the gain of sharding alone
       pfc            PartialFC, sample_rate 1.0: the same loss and gradients, weight sharded
       pfc_s0.1       PartialFC, sample_rate 0.1, optimizer bound (only used rows stepped)

   The first-step losses of dp_full, dp_full_fused and pfc are printed side by side: the numerics are the
   same.

Each step: margin softmax forward and backward from fixed embeddings (the backbone is not timed), the
classifier's communication, an SGD(momentum=0.9) step. Each rank uses one thread (2 ranks on 2 cores).

``--device cuda``: the classifier, the batches and the optimizer state on the GPU; both ranks share the
one GPU through gloo (NCCL refuses two ranks on one device), each step timed up to a
``torch.cuda.synchronize()``; memory per rank is then also measured: the peak of
``torch.cuda.max_memory_allocated()`` over one step of each mode (weight, gradient, state, logits).

Run::

    python benchmarks/partial_fc_bench.py              # ~10 minutes on 2 cores, ~10 GB of RAM
    python benchmarks/partial_fc_bench.py --classes 100000 --steps 3 --warmup 1   # a quick look
    python benchmarks/partial_fc_bench.py --device cuda --steps 4 --memory-worlds 1,2   # on one GPU

Results: a table on the console, JSON and Markdown under ``benchmarks/results/partial_fc_<date>.*``
(``--name`` replaces the ``partial_fc_<date>`` stem, ``--out`` the folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shoal.parallel import ArcFace, PartialFC
from shoal.parallel._ops import _normalize_rows, _Shards, _ShardedSoftmaxCrossEntropy
from shoal.parallel.partial_fc import _init_rows
from shoal.testing import run_ranks

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
# The weight is initialized with generator seeds 0, 1, 2, ... (one per block of rows, _init_rows); batches
# seeded from 0 drew the very same normals, so rank 0's step-0 embeddings were weight rows 0-63 (cosine 1).
# Batch seeds start far above any block seed (at most 245 blocks here), but below 2**32: torch's CPU
# generator keeps only a seed's low 32 bits (manual_seed(1 << 40) draws what manual_seed(0) draws).
_BATCH_SEED_BASE = 2_000_000_000
# One process, no collectives: the softmax over a whole (unsharded) logits matrix.
_LOCAL = _Shards(None, 0, 1, torch.device("cpu"))


def _margin() -> ArcFace:
    return ArcFace(s=64.0, m=0.5)


def _batch(step: int, rank: int, batch: int, dim: int, classes: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(_BATCH_SEED_BASE + 10_000 * step + rank)
    return torch.randn(batch, dim, generator=g).to(device), torch.randint(0, classes, (batch,), generator=g).to(device)


def _sync(device: str) -> None:
    """Wait for the GPU's queued work (the CPU's ops are synchronous)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _classifier_nbytes(weight: torch.Tensor, opt: torch.optim.Optimizer) -> dict:
    state = sum(v.nbytes for v in opt.state.get(weight, {}).values() if torch.is_tensor(v))
    grad = weight.grad.nbytes if weight.grad is not None else 0
    return {"weight_mib": weight.nbytes / MIB, "optimizer_state_mib": state / MIB, "grad_mib": grad / MIB,
            "weight_plus_state_mib": (weight.nbytes + state) / MIB}


class _DataParallelFull:
    """The baseline: the whole weight on every rank, its gradient averaged by one allreduce.

    ``fused``: PartialFC's kernels (the margin is the same module in both variants, already fused).
    """

    def __init__(self, classes: int, dim: int, fused: bool = False, device: str = "cpu"):
        self.weight = torch.nn.Parameter(_init_rows(0, classes, dim, 0, torch.float32).to(device))
        self.opt = torch.optim.SGD([self.weight], lr=0.1, momentum=0.9)
        self.margin = _margin()
        self.fused = fused

    def step(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        e = emb.clone().requires_grad_()
        if self.fused:
            cos = F.linear(F.normalize(e), _normalize_rows(self.weight))
            loss = _ShardedSoftmaxCrossEntropy.apply(self.margin(cos, labels), labels, _LOCAL)
        else:
            logits = self.margin(F.linear(F.normalize(e), F.normalize(self.weight)), labels)
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        dist.all_reduce(self.weight.grad)
        self.weight.grad /= dist.get_world_size()
        self.opt.step()
        return loss.detach()


class _Sharded:
    def __init__(self, classes: int, dim: int, sample_rate: float, device: str = "cpu"):
        # The same seed-0 init as above.
        self.pfc = PartialFC(dim, classes, _margin(), sample_rate=sample_rate, device=device)
        self.weight = self.pfc.weight
        self.opt = torch.optim.SGD(self.pfc.parameters(), lr=0.1, momentum=0.9)
        self.pfc.bind_optimizer(self.opt)

    def step(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.pfc(emb.clone().requires_grad_(), labels)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _rank_memory(classes: int, dim: int, batch: int, device: str = "cpu") -> dict:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = {}
    makers = [("pfc", lambda: _Sharded(classes, dim, 1.0, device)),
              ("dp_full", lambda: _DataParallelFull(classes, dim, device=device))]
    for name, make in makers:
        if name == "dp_full" and dist.get_world_size() == 1:
            continue  # identical to pfc on one rank
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        mode = make()
        mode.step(*_batch(0, rank, batch, dim, classes, device))
        out[name] = _classifier_nbytes(mode.weight, mode.opt)
        if device == "cuda":  # everything the step held at its peak, logits and softmax included
            out[name]["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
        del mode
    return out


def _rank_timing(classes: int, dim: int, batch: int, warmup: int, steps: int, modes: list[str],
                 device: str = "cpu") -> dict:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    makers = {"dp_full": lambda: _DataParallelFull(classes, dim, device=device),
              "dp_full_fused": lambda: _DataParallelFull(classes, dim, fused=True, device=device),
              "pfc": lambda: _Sharded(classes, dim, 1.0, device),
              "pfc_s0.1": lambda: _Sharded(classes, dim, 0.1, device)}
    runners = {m: makers[m]() for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    first_loss = {}
    load_avg = []
    for step in range(warmup + steps):
        load_avg.append(os.getloadavg()[0])
        emb, labels = _batch(step, rank, batch, dim, classes, device)
        for m in modes:
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            loss = runners[m].step(emb, labels)
            _sync(device)
            dist.barrier()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            if step >= warmup:
                times[m].append(float(dt))
            if step == 0:
                if m.startswith("dp_full"):  # local-batch mean -> global-batch mean, for comparison
                    dist.all_reduce(loss)
                    loss /= world
                first_loss[m] = float(loss)
    memory = {m: _classifier_nbytes(runners[m].weight, runners[m].opt) for m in modes}
    return {"times_s": times, "first_loss": first_loss, "memory": memory, "load_avg_1min_per_round": load_avg}


def _hardware(device: str = "cpu") -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hw = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
          "backend": "gloo", "device": device, "threads_per_rank": 1, "load_avg_1min_at_start": os.getloadavg()[0]}
    if device == "cuda":
        hw["gpu"] = torch.cuda.get_device_name()
        hw["backend"] = "gloo (CUDA tensors, both ranks on one GPU)"
    return hw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (the median is reported)")
    parser.add_argument("--modes", default="dp_full,dp_full_fused,pfc,pfc_s0.1")
    parser.add_argument("--memory-worlds", default="1,2,3", help="world sizes of the memory measurement")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON/Markdown results")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--name", default=None, help="file name stem (default partial_fc_<date>)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the classifier lives; cuda: both ranks on the one GPU, through gloo")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False. HINT: run it on a GPU machine with a "
                     "CUDA build of torch (`shoal doctor` says what this one has), or use --device cpu")
    modes = args.modes.split(",")
    hw = _hardware(args.device)
    print(f"hardware: {hw['cpu']}, {hw['cores']} cores{', ' + hw['gpu'] if 'gpu' in hw else ''}; torch "
          f"{hw['torch']}; {hw['backend']}; 1 thread per rank; "
          f"load average {hw['load_avg_1min_at_start']:.1f} at start (other processes skew absolute times)")
    print(f"classifier {args.classes} x {args.dim}, {args.batch} samples per rank, ArcFace(s=64, m=0.5), "
          f"SGD momentum 0.9")

    memory = {}
    worlds = [int(w) for w in args.memory_worlds.split(",")]
    for world in worlds:
        res = run_ranks(_rank_memory, world_size=world, timeout_s=600,
                        args=(args.classes, args.dim, args.batch, args.device))
        memory[world] = res[0]
    print("\nmemory per rank (MiB): weight + optimizer state [+ gradient]"
          + ("; peak CUDA memory of a step" if args.device == "cuda" else ""))
    for world, res in memory.items():
        for name, m in res.items():
            peak = f"  peak {m['peak_cuda_mib']:.1f}" if "peak_cuda_mib" in m else ""
            print(f"  {world} rank(s) {name:8s} {m['weight_plus_state_mib']:9.1f}  [+ {m['grad_mib']:.1f}]{peak}")
    one = memory[worlds[0]]["pfc"]["weight_plus_state_mib"] * worlds[0]
    shrink = {w: memory[w]["pfc"]["weight_plus_state_mib"] / one for w in worlds}
    for w in worlds:
        print(f"  sharded, {w} rank(s): x{shrink[w]:.3f} of the whole classifier (ideal 1/{w} = {1 / w:.3f})")

    world = 2
    res = run_ranks(_rank_timing, world_size=world, timeout_s=600,
                    args=(args.classes, args.dim, args.batch, args.warmup, args.steps, modes, args.device))[0]
    med = {m: statistics.median(ts) for m, ts in res["times_s"].items()}
    print(f"\nstep time on {world} ranks (median of {args.steps} after {args.warmup} warm-up, slowest rank); "
          f"load average per round {min(res['load_avg_1min_per_round']):.1f}-"
          f"{max(res['load_avg_1min_per_round']):.1f}")
    rows = []
    for m in modes:
        vs_dp = med["dp_full"] / med[m] if "dp_full" in med else float("nan")
        vs_fused = med["dp_full_fused"] / med[m] if "dp_full_fused" in med else float("nan")
        rows.append({"mode": m, "median_s": med[m], "min_s": min(res["times_s"][m]),
                     "max_s": max(res["times_s"][m]), "speedup_vs_dp_full": vs_dp,
                     "speedup_vs_dp_full_fused": vs_fused,
                     "first_loss": res["first_loss"][m],
                     "weight_plus_state_mib_per_rank": res["memory"][m]["weight_plus_state_mib"]})
        print(f"  {m:13s} {med[m]:7.3f} s   x{vs_dp:5.2f} vs dp_full   x{vs_fused:5.2f} vs dp_full_fused   "
              f"first loss {res['first_loss'][m]:.6f}   "
              f"{res['memory'][m]['weight_plus_state_mib']:.0f} MiB/rank")
    if "pfc" in med and "pfc_s0.1" in med:
        print(f"  sample_rate 0.1 vs 1.0: x{med['pfc'] / med['pfc_s0.1']:.2f}")

    hw["load_avg_1min_at_end"] = os.getloadavg()[0]
    result = {"benchmark": "partial_fc", "date": args.date, "hardware": hw, "device": args.device,
              "world_size_timing": world,
              "command": " ".join(["python", "benchmarks/partial_fc_bench.py", *sys.argv[1:]]),
              "classes": args.classes, "dim": args.dim, "batch_per_rank": args.batch, "warmup": args.warmup,
              "steps": args.steps, "memory_per_rank": {str(k): v for k, v in memory.items()},
              "memory_fraction_of_whole_per_rank": {str(k): v for k, v in shrink.items()}, "timing": rows,
              "times_s": res["times_s"], "load_avg_1min_per_round": res["load_avg_1min_per_round"],
              "speedup_sample_rate_0.1": med["pfc"] / med["pfc_s0.1"] if {"pfc", "pfc_s0.1"} <= med.keys()
              else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.name or f"partial_fc_{args.date}")
    from _results import write_result  # noqa: PLC0415 (this folder is on sys.path: the script's own)

    write_result(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_result(stem.with_suffix(".md"), _markdown(result))
    print(f"\nsaved {stem}.json and .md")


def _markdown(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# PartialFC benchmark, {r['date']}", "",
             f"{hw['cpu']}, {hw['cores']} cores{', ' + hw['gpu'] if 'gpu' in hw else ''}, torch {hw['torch']}, "
             f"{hw['backend']}, {hw['threads_per_rank']} thread per "
             f"rank. Classifier {r['classes']:,} x {r['dim']}, {r['batch_per_rank']} samples per rank, "
             "ArcFace(s=64, m=0.5), SGD momentum 0.9. Load average (1 min) "
             f"{hw['load_avg_1min_at_start']:.1f} at start, {hw['load_avg_1min_at_end']:.1f} at end: a load above "
             "the core count inflates every absolute time; the modes run interleaved, so ratios suffer less.", "",
             f"Command: `{r['command']}`", "",
             "## Classifier memory per rank (weight + optimizer state)", "",
             "| ranks | mode | weight + state (MiB) | gradient (MiB) | peak CUDA memory of a step (MiB) |",
             "|---|---|---|---|---|"]
    for world, res in r["memory_per_rank"].items():
        for name, m in res.items():
            peak = f"{m['peak_cuda_mib']:.1f}" if "peak_cuda_mib" in m else "-"
            lines.append(f"| {world} | {name} | {m['weight_plus_state_mib']:.1f} | {m['grad_mib']:.1f} | {peak} |")
    lines += [""] + [f"Sharded, {w} rank(s): x{f:.3f} of the whole classifier per rank (ideal {1 / int(w):.3f})."
                     for w, f in r["memory_fraction_of_whole_per_rank"].items()]
    loads = r["load_avg_1min_per_round"]
    lines += ["", f"## Step time, {r['world_size_timing']} ranks (median of {r['steps']} after {r['warmup']} warm-up)",
              "", f"Load average (1 min) per round, warm-up included: {min(loads):.1f} to {max(loads):.1f}, median "
              f"{statistics.median(loads):.1f}.", "",
              "| mode | median (s) | min (s) | max (s) | speed-up vs dp_full | vs dp_full_fused | first-step loss "
              "| MiB/rank |", "|---|---|---|---|---|---|---|---|"]
    for row in r["timing"]:
        lines.append(f"| {row['mode']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['max_s']:.3f} | "
                     f"{row['speedup_vs_dp_full']:.2f} | {row['speedup_vs_dp_full_fused']:.2f} | "
                     f"{row['first_loss']:.6f} | {row['weight_plus_state_mib_per_rank']:.0f} |")
    if r["speedup_sample_rate_0.1"]:
        lines += ["", f"sample_rate 0.1 vs 1.0: x{r['speedup_sample_rate_0.1']:.2f}."]
    lines += ["", "dp_full, dp_full_fused and pfc compute the same loss (float32 rounding apart); pfc_s0.1's loss "
              "is the softmax over the sampled classes only, lower by design. dp_full_fused runs PartialFC's "
              "kernels on the whole weight: pfc vs dp_full_fused is the gain of sharding alone."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
