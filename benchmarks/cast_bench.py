"""Throughput of the 16-bit wire casts: what fp16 / bf16 compression costs on the device, per byte.

With ``compression=fp16`` (or ``bf16``) every float32 bucket is rounded to 16 bits before it leaves the
rank and widened back after (``shoal.core.algorithms._levels``: ``_cast_now`` and ``_widen``, the very
functions timed here), and with error feedback the cast also adds the residual and keeps what rounding
dropped. Each pass reads and writes the whole bucket, so its cost is memory bandwidth: the reference is a
float32 copy of the same bucket (4 bytes read, 4 written per value). Where a cast runs well below that
copy, compression spends more time in the casts than a fast link saves on the wire.

Per wire dtype and bucket size: median milliseconds per call (over ``--blocks`` blocks of ``--reps``
calls, the device synchronized once per block) and GB/s of float32 data through the call.

Run::

    python benchmarks/cast_bench.py --device cuda          # scripts/gpu_check.sh
    python benchmarks/cast_bench.py --sizes-mb 1 16 --reps 5

Results: a table on the console and JSON under ``benchmarks/results/<date>-cast.json`` (``--name``,
``--out``).
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

import torch

from shoal.core.algorithms._levels import _cast_now, _widen

sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 1 << 20


def _cases(src: torch.Tensor, wire: torch.dtype) -> dict:
    """name -> a call that runs one pass over ``src`` (float32) as compression does."""
    dst16 = torch.empty(src.numel(), dtype=wire, device=src.device)
    residual = torch.zeros_like(src)
    back = torch.empty_like(src)
    dst16.copy_(src)
    return {
        "fp32 copy (reference)": lambda: back.copy_(src),
        "cast": lambda: _cast_now(dst16, src, None),
        "cast + error feedback": lambda: _cast_now(dst16, src, residual),
        "widen": lambda: _widen(back, dst16),
        "widen + add": lambda: _widen(back, dst16, add=True),
    }


def _time(call, sync, reps: int, blocks: int) -> float:
    """Median seconds per call over ``blocks`` blocks of ``reps`` calls (one synchronization per block)."""
    call()
    sync()
    per_call = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        sync()
        per_call.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_call)


def run(device: str, sizes_mb: list[float], reps: int, blocks: int) -> dict:
    """Every (wire dtype, size, case): median ms per call and GB/s of float32 input."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict = {}
    for wire in (torch.float16, torch.bfloat16):
        for mb in sizes_mb:
            numel = int(mb * MB) // 4
            src = torch.randn(numel, device=dev)
            for case, call in _cases(src, wire).items():
                if case.startswith("fp32") and wire != torch.float16:
                    continue  # the same for both wire dtypes
                s = _time(call, sync, reps, blocks)
                key = case if case.startswith("fp32") else f"{str(wire).split('.')[-1]} {case}"
                out.setdefault(key, {})[f"{mb:g} MB"] = {"ms": round(s * 1e3, 4),
                                                         "gb_per_s": round(numel * 4 / s / 1e9, 2)}
            del src
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64, 256],
                    help="float32 bucket sizes, MB")
    ap.add_argument("--reps", type=int, default=20, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--name", default="cast", help="results name (default cast)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False. HINT: run it on a GPU machine with a CUDA "
                 "build of torch (`shoal doctor` says what this one has), or use --device cpu")
    torch.set_num_threads(args.threads)
    results = run(args.device, args.sizes_mb, args.reps, args.blocks)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/cast_bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "gpu": gpu, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "reps": args.reps, "blocks": args.blocks, "results": results}
    print(f"16-bit casts on {gpu or 'the CPU (%d thread%s)' % (args.threads, 's' * (args.threads > 1))}; "
          f"torch {torch.__version__}; median ms per call, GB/s of float32 data")
    sizes = [f"{mb:g} MB" for mb in args.sizes_mb]
    print(f"  {'case':34s}" + "".join(f"{s:>22s}" for s in sizes))
    for case, per in results.items():
        print(f"  {case:34s}" + "".join(f"{per[s]['ms']:9.3f} {per[s]['gb_per_s']:7.1f} GB/s" for s in sizes))
    from _results import save_report  # noqa: PLC0415

    print(f"results: {save_report(report, args.name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
