"""Horovod's own examples, unchanged but for the import, on 2 ranks of the real ``shoal run``.

PyTorch: the import change is the shim of ``tests/compat/horovod_shim.py`` (``horovod.torch`` re-exports
``shoal.torch``; a small torchvision stand-in where torchvision cannot be imported). TensorFlow 2: the
example's ``import horovod.tensorflow as hvd`` line is rewritten to ``shoal.tensorflow`` and the example runs
through ``tests/compat/run_horovod_tf.py _rank`` (MNIST from the local wheel where the example downloads it);
on Keras 3 one more visible edit, ``opt.variables()`` -> ``opt.variables`` (the examples' own Keras 2 call),
and unchanged but for the import on Keras 2 (``TF_USE_LEGACY_KERAS=1`` with ``tf_keras`` installed).
Horovod's code is not kept here: set ``COMPAT_HOROVOD_SRC`` to a checkout of horovod/horovod (opt-in also
because the TensorFlow runs take 80-110 s each on 2 shared cores, mostly importing TensorFlow and building
the model). The other
examples and the whole test suites run through ``python tests/compat/horovod_shim.py`` and
``python tests/compat/run_horovod_tf.py`` (docs/robustness.md and docs/tensorflow.md list the results).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_EXAMPLES = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "pytorch")
_TF_EXAMPLES = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "tensorflow2")

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(_EXAMPLES, "pytorch_synthetic_benchmark.py")),
    reason="set COMPAT_HOROVOD_SRC to a checkout of horovod/horovod")


def _write_shim(dest: pathlib.Path) -> pathlib.Path:
    spec = importlib.util.spec_from_file_location("horovod_shim", _ROOT / "tests" / "compat" / "horovod_shim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_shim(dest)


def test_pytorch_synthetic_benchmark_runs_with_only_the_import_changed(run_cli, tmp_path):
    shim = _write_shim(tmp_path / "shim")
    pythonpath = os.pathsep.join([str(shim), str(_ROOT / "src")])
    script = os.path.join(_EXAMPLES, "pytorch_synthetic_benchmark.py")
    res = run_cli(["run", "-np", "2", "python", script, "--model", "small_cnn", "--batch-size", "4",
                   "--num-warmup-batches", "1", "--num-batches-per-iter", "2", "--num-iters", "2"],
                  timeout_s=90, env={"PYTHONPATH": pythonpath})
    assert res.returncode == 0, res.describe()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.describe()


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


@pytest.mark.parametrize("keras", ["3", "2"])
def test_tensorflow2_synthetic_benchmark_runs_with_the_import_changed(run_cli, tmp_path, monkeypatch, keras):
    monkeypatch.chdir(tmp_path)
    argv, env = _tf_example("tensorflow2_synthetic_benchmark.py", tmp_path, keras)
    res = run_cli([*argv, "--no-cuda", "--model", "MobileNetV2", "--batch-size", "2", "--num-warmup-batches",
                   "1", "--num-batches-per-iter", "1", "--num-iters", "1"], timeout_s=240, env=env)
    assert res.returncode == 0, res.describe()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.describe()


@pytest.mark.parametrize("keras", ["3", "2"])
def test_tensorflow2_mnist_runs_with_the_import_changed(run_cli, tmp_path, monkeypatch, keras):
    monkeypatch.chdir(tmp_path)  # rank 0 saves ./checkpoints*
    # 4 steps per rank instead of 10000 // size: that 2 ranks train as one process does is tested in
    # tests/dist/test_tensorflow.py; here, that the example's own code runs (data, tf.function, broadcast).
    argv, env = _tf_example("tensorflow2_mnist.py", tmp_path, keras, [("10000 // hvd.size()", "8 // hvd.size()")])
    res = run_cli(argv, timeout_s=240, env=env)
    assert res.returncode == 0, res.describe()
    assert "Step #0\tLoss:" in res.stdout, res.describe()
