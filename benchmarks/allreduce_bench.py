"""Allreduce benchmark: flat vs hierarchical, full precision vs 16-bit, 8-bit, low-rank and mixed compression.

One buffer (``--size-mb``, default 100 MB of float32) is reduced by each mode in turn, in interleaved
rounds (a noisy neighbour hurts every mode alike), through the same algorithms the gradient engine uses
(:func:`shoal.core.algorithms.get_algorithm`). Per mode: the median of the slowest rank's time, the
ratio against flat float32 (one ``all_reduce``, the baseline measured in the same run), and the largest
difference from the float32 result (modes with the same numerics must agree exactly).

Modes (``--modes``):

    flat              one torch.distributed all_reduce of the float32 buffer (the baseline)
    flat_fp16         float16 on the wire, summed in float32 (shoal.core.algorithms.allreduce_fp16)
    flat_bf16         the same with bfloat16
    hier              hierarchical, float32: reduce-scatter in the node, allreduce across, allgather
    hier_fp16         hierarchical, float16 inside and across nodes
    hier_mixed        hierarchical, float32 inside the node, float16 across nodes (mixed_fp16)
    hier_mixed_bf16   the same with bfloat16 across nodes
    flat_int8         8-bit blocks on the wire (a float32 scale per 256 values, error feedback), summed in
                      float32 (shoal.core.algorithms.allreduce_int8)
    hier_int8         hierarchical, 8 bits inside and across nodes
    hier_mixed_int8   hierarchical, float32 inside the node, 8 bits across nodes (mixed_int8)
    flat_powersgd     PowerSGD at rank 4 from the first round, each bucket seen as one near-square
                      matrix (random data is the worst case for a low-rank approximation: its
                      difference from flat says nothing about gradients; the time is the point)
    hier_mixed_powersgd  float32 inside the node, PowerSGD across nodes (mixed_powersgd)

Launch (2 nodes x 2 ranks in an emulated cluster, 1 Gbit/s between nodes; needs root)::

    python benchmarks/allreduce_bench.py --link 1gbit --layout 2x2

Without ``--link``, the ranks run on this host's loopback, with nodes emulated by ``SHOAL_LOCAL_SIZE``::

    python benchmarks/allreduce_bench.py --layout 2x2

Results: a table on the console and JSON under ``benchmarks/results/`` (date, machine, load average,
command). Each rank uses one torch thread (``--threads``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: mode -> (compression, hierarchical)
MODES = {
    "flat": ("none", "off"),
    "flat_fp16": ("fp16", "off"),
    "flat_bf16": ("bf16", "off"),
    "hier": ("none", "on"),
    "hier_fp16": ("fp16", "on"),
    "hier_mixed": ("mixed_fp16", "on"),
    "hier_mixed_bf16": ("mixed_bf16", "on"),
    "flat_int8": ("int8", "off"),
    "hier_int8": ("int8", "on"),
    "hier_mixed_int8": ("mixed_int8", "on"),
    "flat_powersgd": ("powersgd:rank=4,start_step=0", "off"),
    "hier_mixed_powersgd": ("mixed_powersgd:rank=4,start_step=0", "on"),
}
DEFAULT_MODES = ["flat", "flat_fp16", "hier", "hier_fp16", "hier_mixed"]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _matrix(numel: int):
    """The bucket as one near-square matrix, for the PowerSGD modes (the rest of it a vector)."""
    rows = max(1, int(numel ** 0.5))
    return lambda: [(0, (rows, numel // rows))]


def worker(args) -> int:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.core.runtime as rt  # noqa: PLC0415
    from shoal.core.algorithms import ReduceContext, _levels, get_algorithm  # noqa: PLC0415
    from shoal.core.env import get_env  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    rt.init(timeout_s=args.timeout_s)
    rank, world = rt.rank(), rt.size()
    if args.chunk_mb:
        _levels.CHUNK_NBYTES = int(args.chunk_mb * 1024 * 1024)
    if args.lead_chunks is not None:
        _levels._LEAD_CHUNKS = args.lead_chunks
    if args.no_ramp:
        _levels._RAMP = False
    ps = rt.global_process_set
    streams = rt.stream_groups(ps, args.num_streams)
    algos = {m: get_algorithm(*MODES[m], ps, num_streams=args.num_streams) for m in args.modes}
    numel = int(args.size_mb * 1e6) // 4
    torch.manual_seed(1234 + rank)
    source = torch.randn(numel)
    buf = torch.empty(numel)
    per_bucket = -(-numel // args.buckets)
    states = {m: [{} for _ in range(args.buckets)] for m in args.modes}

    def run(mode: str) -> tuple[float, float]:
        buf.copy_(source)
        dist.barrier()
        c0 = time.process_time()  # this rank's CPU, every thread: load-independent cost of a mode
        t0 = time.perf_counter()
        futs = []
        for b in range(args.buckets):
            part = buf[b * per_bucket:(b + 1) * per_bucket]
            ctx = ReduceContext(group=streams[b % len(streams)], process_set=ps, postscale=1.0 / world,
                                bucket_index=b, state=states[mode][b], layout=_matrix(part.numel()))
            futs.append(algos[mode](part, ctx))
        for f in futs:
            f.wait()
        return time.perf_counter() - t0, time.process_time() - c0

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu: dict[str, list[float]] = {m: [] for m in args.modes}
    reference = None
    errors = {}
    for rnd in range(args.rounds + 1):  # round 0: warm-up (connections, scratch buffers), flat first
        order = args.modes[rnd % len(args.modes):] + args.modes[:rnd % len(args.modes)]
        for mode in order:
            dt, dc = run(mode)
            if rnd:
                times[mode].append(dt)
                cpu[mode].append(dc)
            elif mode == "flat":
                reference = buf.clone()
            else:
                errors[mode] = float((buf - reference).abs().max())
    errors["flat"] = 0.0
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (times, cpu))
    result = {}
    for mode in args.modes:
        worst = [max(t[mode][i] for t, _ in everyone) for i in range(args.rounds)]
        cpu_ms = statistics.median(sum(c[mode][i] for _, c in everyone) for i in range(args.rounds)) * 1e3
        result[mode] = {"median_ms": statistics.median(worst) * 1e3, "min_ms": min(worst) * 1e3,
                        "max_ms": max(worst) * 1e3, "cpu_ms_all_ranks": cpu_ms,
                        "max_abs_diff_vs_flat": errors.get(mode)}
    base = result.get("flat", {}).get("median_ms")
    for m in result.values():
        m["speedup_vs_flat"] = base / m["median_ms"] if base else None
    if rank == 0:
        lay = rt.layout()
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": args.command,
            "link": get_env("SHOAL_CLUSTER_LINK") or "one host, loopback",
            "layout": f"{len(lay.nodes)} nodes x {len(lay.nodes[0])} ranks",
            "size_mb": args.size_mb, "buckets": args.buckets, "num_streams": args.num_streams,
            "chunk_mb": _levels.CHUNK_NBYTES / 1024 / 1024 if _levels.CHUNK_NBYTES else "adaptive",
            "lead_chunks": _levels._LEAD_CHUNKS, "ramp": _levels._RAMP, "rounds": args.rounds, "threads": args.threads,
            "cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "uptime_before": args.uptime_before, "uptime_after": _uptime(),
            "modes": result,
        }
        print(f"allreduce of {args.size_mb:g} MB float32, {report['layout']}, link: {report['link']}; "
              f"{args.buckets} bucket(s), {args.num_streams} streams, chunks: {report['chunk_mb']} MB; "
              f"torch {torch.__version__}; {report['cores']} cores; median of {args.rounds} rounds")
        print(f"{'mode':<20} {'median ms':>10} {'min':>8} {'max':>8} {'vs flat':>8} {'CPU ms':>8} {'max |diff|':>11}")
        for mode, m in result.items():
            diff = m["max_abs_diff_vs_flat"]
            print(f"{mode:<20} {m['median_ms']:>10.0f} {m['min_ms']:>8.0f} {m['max_ms']:>8.0f} "
                  f"{m['speedup_vs_flat'] or 0:>7.2f}x {m['cpu_ms_all_ranks']:>8.0f} "
                  f"{'' if diff is None else f'{diff:.2e}':>11}")
        print("CPU ms: process CPU time (all threads) of every rank together, median over rounds; the "
              "kernel's work for loopback and the shaped link is partly outside it")
        print(f"load: {report['uptime_after']}")
        if args.save:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = RESULTS_DIR / f"{stamp}-allreduce-hierarchical-compression-{args.layout}-{args.name}.json"
            from _results import write_result  # noqa: PLC0415 (this folder is on sys.path: the script's own)

            write_result(path, json.dumps(report, indent=2) + "\n")
            print(f"results: {path}")
    dist.barrier()
    rt.shutdown()
    return 0


def launch(args, argv: list[str]) -> int:
    """Start this script on every rank: in an emulated cluster (``--link``) or on loopback."""
    nodes, per_node = args.nodes, args.per_node
    me = [sys.executable, str(Path(__file__).resolve()), *argv, "--uptime-before", _uptime()]
    if args.link:
        from shoal.testing.cluster import run_in_cluster  # noqa: PLC0415

        return run_in_cluster(me, nodes=nodes, ranks_per_node=per_node, rate=args.link,
                              timeout_s=args.timeout_s)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nodes * per_node}",
           *me[1:]]
    env = {**os.environ, "SHOAL_LOCAL_SIZE": str(per_node), "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.run(cmd, env=env, timeout=args.timeout_s).returncode


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="2x2", help="NODESxRANKS_PER_NODE (default 2x2)")
    ap.add_argument("--link", default=None, metavar="RATE",
                    help="emulated cluster, nodes joined by a RATE link (tc units, e.g. 1gbit); needs root")
    ap.add_argument("--size-mb", type=float, default=100.0, help="float32 megabytes reduced (default 100)")
    ap.add_argument("--buckets", type=int, default=1, help="split the buffer into this many buckets in flight")
    ap.add_argument("--num-streams", type=int, default=2, help="streams (groups) the buckets rotate over")
    ap.add_argument("--chunk-mb", type=float, default=None, help="override the pipeline's chunk size")
    ap.add_argument("--lead-chunks", type=int, default=None, help="override how far the first stage runs ahead")
    ap.add_argument("--no-ramp", action="store_true", help="chunks of one size (no small first and last chunks)")
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES), metavar="MODE",
                    help=f"modes: {', '.join(MODES)} (default: {' '.join(DEFAULT_MODES)})")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--name", default=None, help="suffix of the results file (default: the link)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the run")
    ap.add_argument("--no-save", dest="save", action="store_false", help="print only, write no results file")
    ap.add_argument("--uptime-before", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.nodes, args.per_node = (int(v) for v in args.layout.lower().split("x"))
    except ValueError:
        ap.error(f"--layout must look like 2x2, got {args.layout!r}")
    # The baseline of every ratio and the reference of every difference: first.
    args.modes = ["flat"] + [m for m in dict.fromkeys(args.modes) if m != "flat"]
    args.name = args.name or (args.link or "loopback")
    shown = list(argv)
    if "--uptime-before" in shown:
        i = shown.index("--uptime-before")
        del shown[i:i + 2]
    args.command = shlex.join(["python", "benchmarks/allreduce_bench.py", *shown])
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from shoal.core.env import get_env  # noqa: PLC0415

    if get_env("RANK") is None:
        return launch(args, argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
