"""Python helpers of scripts/gpu_check.sh: ``doctor`` (what the machine has: the interpreter, torch, the GPUs,
then `shoal doctor`'s report, as text and as JSON, from one probe) and ``summary`` (the table at the end).

``summary`` reads what this run wrote into the results folder (files newer than the run's start, so that an
earlier run of the same day is never reported), prints a Markdown summary and saves it as
``<date>-gpu-summary.md``. Targets (issue 20): the NaN check <= 1% of a step, a world of one <= 2% over the
bare optimizer. A missed target is a finding shown in the table, not a failure of the check; a dry run's
tiny CPU numbers are shown without a verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

_TARGETS = {"nan_check": 1.0, "world_of_one": 2.0}


def _newest(out: Path, pattern: str, since: float) -> Optional[Path]:
    found = [p for p in out.glob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _load(out: Path, pattern: str, since: float) -> tuple[Optional[Path], Optional[dict]]:
    path = _newest(out, pattern, since)
    if path is None:
        return None, None
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, None


#: Set by ``summary --mode dry``: tiny CPU runs measure nothing worth a verdict.
_DRY = False


def _verdict(value: float, target: float) -> str:
    if _DRY:
        return f"(dry run; target <= {target:g}%)"
    return f"meets the target (<= {target:g}%)" if value <= target else f"ABOVE the target ({target:g}%)"


def doctor(json_out: Path) -> int:
    """Print the interpreter, torch, its CUDA and NCCL, the GPUs and the CPU, then `shoal doctor`'s report;
    write the report as JSON to ``json_out`` (one probe for both: torch's import is the slow part)."""
    import torch  # noqa: PLC0415

    print("python", sys.version.split()[0], sys.executable)
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
        print("nccl", ".".join(str(v) for v in torch.cuda.nccl.version()))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        print("nvidia-smi:", smi.stdout.strip() or smi.stderr.strip())
    print("cpu", platform.processor() or platform.machine(), os.cpu_count(), "cores")
    print()
    from shoal.core.files import atomic_write  # noqa: PLC0415 (src/ is on PYTHONPATH: gpu_check.sh)
    from shoal.runner.doctor import collect, render  # noqa: PLC0415

    report = collect()
    render(report)
    with atomic_write(json_out) as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def _stages(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds, _file = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append([name, status, f"{seconds} s"])
    return rows


def _tests(out: Path, date: str) -> list[str]:
    path = out / f"{date}-gpu-tests.txt"
    if not path.exists():
        return ["tests/gpu: no log"]
    text = path.read_text(errors="replace")
    totals = re.findall(r"^=+ (.+ in [0-9.]+s.*?) =+$", text, re.M)
    lines = [f"tests/gpu: {totals[-1] if totals else 'no pytest summary (killed?)'}"]
    lines += [f"  {m}" for m in re.findall(r"^(FAILED tests/gpu/\S+.*)$", text, re.M)]
    lines += [f"  {m}" for m in re.findall(r"^(ERROR tests/gpu/\S+.*)$", text, re.M)]
    return lines


def _nan_check(data: dict) -> list[list[str]]:
    rows = []
    for model, r in data.get("models", {}).items():
        pct = r["step_overhead_pct"]
        share = r.get("check_pct_of_step")
        rows.append([f"NaN check, {model}", f"{r['off']['median_step_ms']:.2f} -> {r['raise']['median_step_ms']:.2f} ms",
                     f"{pct:+.2f}%" + (f" (check {share:.2f}% of the step)" if share is not None else ""),
                     _verdict(pct, _TARGETS["nan_check"])])
    return rows


def _world_of_one(data: dict) -> list[list[str]]:
    rows = []
    for model, info in data.get("models", {}).items():
        modes = info.get("modes", {})
        bare = modes.get("nocomm", {}).get("median_ms")
        for mode in ("shoal", "ddp"):
            m = modes.get(mode, {})
            if m.get("status") != "ok" or not bare:
                if m:
                    rows.append([f"world of one, {model}, {mode}", "-", m.get("reason", m.get("status", "?")), ""])
                continue
            pct = 100 * (m["median_ms"] / bare - 1)
            rows.append([f"world of one, {model}, {mode} vs bare", f"{bare:.2f} -> {m['median_ms']:.2f} ms",
                         f"{pct:+.2f}%", _verdict(pct, _TARGETS["world_of_one"]) if mode == "shoal" else "(reference)"])
    return rows


def _partial_fc(data: dict) -> list[list[str]]:
    rows = []
    for row in data.get("timing", []):
        rows.append([f"PartialFC {data['classes']:,} classes, {row['mode']}", f"{row['median_s'] * 1e3:.1f} ms/step",
                     f"x{row['speedup_vs_dp_full']:.2f} vs dp_full",
                     f"{row['weight_plus_state_mib_per_rank']:.1f} MiB/rank weight+state"])
    for world, res in data.get("memory_per_rank", {}).items():
        for name, m in res.items():
            peak = f"peak {m['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in m else "no CUDA peak (CPU)"
            rows.append([f"PartialFC memory, {world} ranks, {name}", f"{m['weight_plus_state_mib']:.1f} MiB", peak,
                         "weight + optimizer state per rank"])
    return rows


def _cast(data: dict) -> list[list[str]]:
    results = data.get("results", {})
    if not results:
        return []
    size = list(next(iter(results.values())))[-1]  # the largest bucket measured
    ref = results.get("fp32 copy (reference)", {}).get(size, {}).get("gb_per_s")
    rows = []
    for case, per in results.items():
        gbs = per[size]["gb_per_s"]
        rows.append([f"cast, {case}, {size}", f"{per[size]['ms']:.3f} ms", f"{gbs:.1f} GB/s",
                     f"{gbs / ref:.2f} x the fp32 copy" if ref else ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    dp = sub.add_parser("doctor", help="what this machine has")
    dp.add_argument("--json-out", required=True, type=Path)
    sp = sub.add_parser("summary", help="the table at the end of the check")
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--date", required=True)
    sp.add_argument("--stages", required=True, type=Path)
    sp.add_argument("--since", required=True, type=float, help="the run's start (epoch seconds)")
    sp.add_argument("--mode", default="gpu", choices=("gpu", "dry"))
    args = ap.parse_args(argv)
    if args.command == "doctor":
        return doctor(args.json_out)
    global _DRY
    _DRY = args.mode == "dry"
    out, since = args.out, args.since - 1
    lines = [f"# Shoal GPU check, {args.date} ({'GPU run' if args.mode == 'gpu' else 'dry run on the CPU, tiny sizes'})",
             ""]
    head = out / f"{args.date}-gpu-doctor.txt"
    if head.exists():  # its first lines, up to the blank line before shoal doctor's tables
        lines += ["```", *head.read_text(errors="replace").split("\n\n")[0].strip().splitlines(), "```", ""]
    lines += ["## Stages", "", *_table(["stage", "outcome", "time"], _stages(args.stages)), ""]
    lines += [*_tests(out, args.date), ""]
    numbers: list[list[str]] = []
    sources = []
    for pattern, fn in ((f"{args.date}-gpu-nan_check*.json", _nan_check),
                        (f"{args.date}-gpu-world_of_one*.json", _world_of_one),
                        (f"{args.date}-gpu-partial_fc*.json", _partial_fc),
                        (f"{args.date}-gpu-fp16_cast*.json", _cast)):
        path, data = _load(out, pattern, since)
        if data is None:
            numbers.append([pattern.split("-gpu-")[1].split("*")[0], "no result file" if path is None else
                            f"unreadable: {path.name}", "", ""])
            continue
        sources.append(path.name)
        try:
            numbers += fn(data)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            numbers.append([path.name, f"cannot summarize: {type(exc).__name__}: {exc}", "", ""])
    lines += ["## Numbers", "", *_table(["what", "time", "ratio", "note"], numbers), ""]
    if sources:
        lines += ["From " + ", ".join(sources) + "; shoal doctor's report: "
                  f"{args.date}-gpu-doctor.txt / .json.", ""]
    text = "\n".join(lines)
    print(text)
    from shoal.core.files import atomic_write  # noqa: PLC0415 (src/ is on PYTHONPATH: gpu_check.sh)

    with atomic_write(out / f"{args.date}-gpu-summary.md") as f:  # never written through a planted link
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
