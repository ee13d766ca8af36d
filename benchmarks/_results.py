"""Where the benchmarks write their results: one JSON per run under ``benchmarks/results/``.

Shared by the benchmark scripts (each runs with this folder first on ``sys.path``, as Python puts a script's
own folder there).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

__all__ = ["RESULTS_DIR", "save_report"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_report(report: dict, name: str) -> Path:
    """Write ``report`` to ``results/<today>-<name>.json`` (``-2``, ``-3``, ... when taken) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{name}"
    path, n = RESULTS_DIR / f"{stem}.json", 2
    while path.exists():
        path, n = RESULTS_DIR / f"{stem}-{n}.json", n + 1
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
