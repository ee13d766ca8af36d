"""Horovod's own PyTorch example, unchanged but for the import, on 2 ranks of the real ``shoal run``.

The import change is the shim of ``tests/compat/horovod_shim.py`` (``horovod.torch`` re-exports
``shoal.torch``; a small torchvision stand-in where torchvision cannot be imported). Horovod's code is not
kept here: set ``COMPAT_HOROVOD_SRC`` to a checkout of horovod/horovod. The other examples and the
whole test suite run through ``python tests/compat/horovod_shim.py`` (docs/robustness.md lists the results).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_EXAMPLES = os.path.join(os.environ.get("COMPAT_HOROVOD_SRC", ""), "examples", "pytorch")

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
