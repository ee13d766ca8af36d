"""Where the benchmarks write their results: one JSON per run under ``benchmarks/results/``.

Shared by the benchmark scripts (each runs with this folder first on ``sys.path``, as Python puts a script's
own folder there).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from shoal.core.files import atomic_write, create_new

__all__ = ["RESULTS_DIR", "save_report", "write_result"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_report(report: dict, name: str, directory: str | Path | None = None) -> Path:
    """Write ``report`` to ``results/<today>-<name>.json`` (``-2``, ``-3``, ... when taken) and return the path.

    ``directory`` replaces ``results/`` (a benchmark's ``--out``: scripts/gpu_check.sh's dry run writes to a
    temporary folder). Each name is created exclusively (``shoal.core.files.create_new``): a name taken
    meanwhile, or a link planted there, moves on to the next number instead of being written through.
    """
    folder = RESULTS_DIR if directory is None else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{name}"
    path, n = folder / f"{stem}.json", 2
    while True:
        try:
            f = create_new(path, "w")
            break
        except FileExistsError:
            path, n = folder / f"{stem}-{n}.json", n + 1
    with f:
        f.write(json.dumps(report, indent=1) + "\n")
    return path


def write_result(path: Path, data: str | bytes) -> Path:
    """Write a result file whole (text or bytes), replacing a file or link at ``path``, never writing through a
    link (``shoal.core.files.atomic_write``): output folders may be shared, e.g. under ``/tmp``."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path
