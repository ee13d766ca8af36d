"""``shoal.tensorflow`` without a process group of several ranks: the surface Horovod's TF scripts use, the
arguments the tape refuses, a world of one, ``shoal.tensorflow.keras`` being ``shoal.keras``, and the
install line when TensorFlow is missing.

The checks that import TensorFlow run in one fresh interpreter (importing it costs the pytest process 5-30 s
here); the multi-rank behaviour is in tests/dist/test_tensorflow.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "shoal"

#: What Horovod's TensorFlow 2 scripts and test_tensorflow.py call (horovod.tensorflow's public surface,
#: minus the TF1 session hooks).
HOROVOD_TF_NAMES = (
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "is_homogeneous", "rank_op", "size_op", "local_rank_op", "local_size_op", "process_set_included_op",
    "start_timeline", "stop_timeline", "allreduce", "grouped_allreduce", "allgather", "grouped_allgather",
    "broadcast", "broadcast_", "alltoall", "reducescatter", "grouped_reducescatter", "broadcast_variables",
    "broadcast_global_variables", "broadcast_object", "broadcast_object_fn", "allgather_object", "join",
    "DistributedGradientTape", "PartialDistributedGradientTape", "DistributedOptimizer", "SyncBatchNormalization",
    "Compression", "Average", "Sum", "Adasum", "Min", "Max", "Product", "ProcessSet", "global_process_set",
    "add_process_set", "remove_process_set", "nccl_built", "gloo_built", "mpi_built", "cuda_built", "rocm_built",
    "ddl_built", "ccl_built", "mpi_enabled", "gloo_enabled", "mpi_threads_supported", "elastic",
)

_TIMEOUT_S = 180

_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
import shoal.keras
import shoal.tensorflow as hvd
import shoal.tensorflow.keras as hk

out = {"keras_is_keras": hk is shoal.keras, "dir_is_all": dir(hvd) == sorted(hvd.__all__),
       "missing": [n for n in json.loads(sys.argv[1]) if not hasattr(hvd, n)]}


def err(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


out["before_init"] = err(lambda: hvd.DistributedGradientTape(tf.GradientTape()))
hvd.init()
w = tf.Variable([1.0, 2.0])
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(w * w)
out["not_a_tape"] = err(lambda: hvd.DistributedGradientTape(object()))
out["op"] = err(lambda: hvd.DistributedGradientTape(tape, op=hvd.Max))
out["predivide"] = err(lambda: hvd.DistributedGradientTape(tape, op=hvd.Sum, gradient_predivide_factor=2.0))
out["groups"] = err(lambda: hvd.DistributedGradientTape(tape, groups=-1))
out["skip"] = err(lambda: hvd.DistributedGradientTape(tape, nan_check="skip"))
out["knob"] = err(lambda: hvd.DistributedGradientTape(tape, fusion_threshold_mb=0))
out["unknown"] = err(lambda: hvd.DistributedGradientTape(tape, bucket_mb=4))
out["twice"] = err(lambda: hvd.DistributedGradientTape(hvd.DistributedGradientTape(tape)))
out["legacy_opt"] = err(lambda: hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1)))
dtape = hvd.DistributedGradientTape(tape)
out["world_of_one"] = dtape.gradient(loss, [w])[0].numpy().tolist()  # the local gradient, as it is
out["watched"] = dtape.watched_variables()[0] is w                      # the wrapped tape's surface
out["allreduce"] = hvd.allreduce(tf.constant([3.0])).numpy().tolist()
out["bcast_global_eager"] = err(lambda: hvd.broadcast_global_variables(0))
print("RESULT " + json.dumps(out))
"""


def _run(code: str, *args: str, env_extra: dict | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow", **(env_extra or {})}
    for name in [k for k in env if k.startswith(("SHOAL_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))]:
        env.pop(name)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=_TIMEOUT_S, start_new_session=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_tensorflow_keras_all_is_shoal_keras_all():
    """shoal/tensorflow/keras.py writes shoal.keras' __all__ out (every module has a literal one): they agree."""
    def literal_all(path: pathlib.Path) -> list[str]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                return [e.value for e in node.value.elts]
        raise AssertionError(f"no __all__ in {path}")

    assert literal_all(SRC / "tensorflow" / "keras.py") == literal_all(SRC / "keras" / "__init__.py")


def test_tensorflow_surface_and_arguments():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'shoal[tensorflow]')")
    out = _run(_SCRIPT, json.dumps(HOROVOD_TF_NAMES))
    assert out["missing"] == [], out["missing"]
    assert out["keras_is_keras"] and out["dir_is_all"]
    assert out["before_init"].startswith("NotInitializedError"), out["before_init"]
    assert out["not_a_tape"].startswith("TypeError") and "tf.GradientTape" in out["not_a_tape"]
    assert out["op"].startswith("ValueError") and "Average or Sum" in out["op"], out["op"]
    assert out["predivide"].startswith("ValueError") and "op=Average" in out["predivide"], out["predivide"]
    assert out["groups"].startswith("ValueError") and "groups" in out["groups"], out["groups"]
    assert out["skip"].startswith("ValueError") and "HINT" in out["skip"], out["skip"]
    assert out["knob"].startswith("ValueError") and "fusion_threshold_mb" in out["knob"], out["knob"]
    assert out["unknown"].startswith("TypeError") and "bucket_mb" in out["unknown"], out["unknown"]
    assert out["twice"].startswith("ValueError") and "already" in out["twice"], out["twice"]
    assert out["legacy_opt"].startswith("TypeError") and "DistributedGradientTape" in out["legacy_opt"]
    assert out["world_of_one"] == [2.0, 4.0]
    assert out["watched"] is True
    assert out["allreduce"] == [3.0]
    assert out["bcast_global_eager"].startswith("RuntimeError"), out["bcast_global_eager"]


_MISSING = r"""
import json, sys


class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
try:
    import shoal.tensorflow  # noqa: F401
except Exception as exc:
    print("RESULT " + json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print("RESULT " + json.dumps({"type": None, "message": ""}))
"""


def test_import_without_tensorflow_names_the_install_line():
    out = _run(_MISSING)
    assert out["type"] == "ImportError", out
    assert "pip install 'shoal[tensorflow]'" in out["message"] and "HINT" in out["message"], out["message"]
