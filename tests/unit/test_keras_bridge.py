"""The DLPack bridge of ``shoal.keras`` and TensorFlow's 64-byte rule (docs/keras.md, "DLPack alignment").

TensorFlow accepts a DLPack buffer that is not 64-byte aligned and then aborts the process at the first
op that reads it (``Check failed: IsAligned()``, SIGABRT, no Python error). Measured here with TF 2.21 on
views of a torch buffer: float32 at element offset 1 (4 bytes) and 8 (32 bytes), float64 at 4, bfloat16
and float16 at 16 (32 bytes) abort; offsets that are multiples of 64 bytes do not. The bridge
(``_bridge.aligned``, used by ``from_torch``) hands TF the engine's buffer itself where it is aligned and
an aligned copy where it is not. What is checked here:

- ``aligned`` itself (no TensorFlow needed): the tensor itself when aligned, else an aligned copy with the
  same values, for 4- and 2-byte dtypes;
- TensorFlow through the bridge: a float32 view at offset 1 (eager, and as the output of the host call
  inside ``tf.function``, which is how reduced gradients come back) runs ops without aborting; 16-bit
  bucket views laid out by the engine's planner (``plan_buckets``), handed over one by one, are zero-copy
  exactly where they start on 64 bytes and copied exactly where they do not;
- the control: the same misaligned view handed to TF without the bridge does abort, so the cases above
  exercise the real pitfall on the installed TF.

TF runs in a fresh interpreter (its own session, killed on timeout): an abort must fail a test, not
pytest, and the pytest process must not import TensorFlow (5-30 s here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

#: A fresh interpreter importing torch, Keras and (for the TF cases) TensorFlow: 5-15 s here; 180 s for a
#: loaded 2-core machine.
_TIMEOUT_S = 180

_ALIGNED_SCRIPT = r"""
import json
import torch
from shoal.keras import _bridge

out = {}
for dtype, bad, good in ((torch.float32, 1, 16), (torch.bfloat16, 16, 32), (torch.float16, 48, 64)):
    buf = torch.arange(128, dtype=torch.float32).to(dtype)
    assert buf.data_ptr() % 64 == 0  # torch's CPU allocator aligns to 64 bytes
    name = str(dtype).split(".")[1]
    v = buf[bad:bad + 16].view(4, 4)
    a = _bridge.aligned(v)
    out[name + "_misaligned"] = {"view_mod": v.data_ptr() % 64, "copy_mod": a.data_ptr() % 64,
                                 "same": a.data_ptr() == v.data_ptr(), "equal": bool(torch.equal(a, v)),
                                 "shape": list(a.shape), "dtype": str(a.dtype)}
    g = buf[good:good + 16]
    out[name + "_aligned_is_itself"] = _bridge.aligned(g) is g
out["empty_is_itself"] = all(_bridge.aligned(e) is e for e in (torch.empty(0)[0:0], torch.zeros(3)[1:1]))
print("RESULT " + json.dumps(out), flush=True)
"""

_TF_SCRIPT = r"""
import json
import sys
import tensorflow as tf
import torch
from shoal.core.buckets import TensorSpec, plan_buckets
from shoal.keras import _bridge

def shares(tf_tensor, view):
    # TF -> torch is zero-copy, so this is the address TF reads from.
    return torch.from_dlpack(tf_tensor).data_ptr() == view.data_ptr()

out = {}
buf = torch.arange(64, dtype=torch.float32)

# float32 at element offset 1: copied, then ops run (before the bridge, this aborted the process)
v = buf[1:17]
t = _bridge.from_torch(v, "tensorflow")
m = tf.reshape(t, (4, 4))
out["f32_offset1"] = {"copied": not shares(t, v), "copy_mod": torch.from_dlpack(t).data_ptr() % 64,
                      "sum": float(tf.reduce_sum(t)), "matmul": tf.matmul(m, m).numpy().tolist()}
out["f32_offset1_expected"] = {"sum": float(v.sum()), "matmul": (v.view(4, 4) @ v.view(4, 4)).tolist()}
out["f32_offset16_zero_copy"] = shares(_bridge.from_torch(buf[16:32], "tensorflow"), buf[16:32])

# the host call inside tf.function returns the misaligned view, as a reduction returns bucket views
@tf.function
def graph(x):
    (r,) = _bridge.run_on_host(lambda ts: [buf[1:17].view(4, 4) * 1 + ts[0]], [x], [((4, 4), "float32")],
                               "tensorflow", what="test")
    return tf.matmul(r, r)
out["graph_matmul"] = graph(tf.zeros((4, 4))).numpy().tolist()

# 16-bit buckets as the engine lays them out (odd sizes; one bucket per dtype), every view handed to TF
specs = [TensorSpec(f"{d}.{i}", s, getattr(torch, d), torch.device("cpu"))
         for d in ("bfloat16", "float16") for i, s in enumerate([(3,), (17,), (5, 4), (33,), (16,), (2, 9)])]
views = []
for plan in plan_buckets(specs, bucket_nbytes=1 << 20):
    bucket = torch.randn(plan.numel).to(plan.dtype)  # the reducer allocates each bucket as one tensor
    for tid, off in zip(plan.tensor_ids, plan.offsets):
        views.append((specs[tid], bucket[off:off + specs[tid].numel].view(specs[tid].shape)))
rows = []
for spec, view in views:
    t = _bridge.from_torch(view, "tensorflow")
    rows.append({"name": spec.name, "aligned": view.data_ptr() % 64 == 0, "zero_copy": shares(t, view),
                 "sum_tf": float(tf.reduce_sum(tf.cast(t, tf.float32))), "sum_torch": float(view.float().sum()),
                 "equal": bool((torch.from_dlpack(t) == view).all())})
out["buckets16"] = rows
print("RESULT " + json.dumps(out), flush=True)

# the control: the same float32 view without the bridge must abort the process (the pitfall is real)
raw = tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(buf[1:17]))
print("CONTROL-START", flush=True)
print("CONTROL-SURVIVED", float(tf.reduce_sum(raw)), flush=True)
"""


def _run(tmp_path, backend: str, script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with ``KERAS_BACKEND=backend``, in its own session (killed whole
    on timeout)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "KERAS_HOME": str(tmp_path / "keras"), "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the bridge check (KERAS_BACKEND={backend}) did not finish within {_TIMEOUT_S} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _result(proc: subprocess.CompletedProcess) -> dict:
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"no result (exit status {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULT "):])


def _needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'shoal[tensorflow]')")


def test_aligned_returns_the_tensor_or_an_aligned_copy(tmp_path):
    _needs("keras")
    proc = _run(tmp_path, "torch", _ALIGNED_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = _result(proc)
    for name in ("float32", "bfloat16", "float16"):
        mis = out[f"{name}_misaligned"]
        assert mis["view_mod"] != 0, mis  # the case is really misaligned
        assert mis["copy_mod"] == 0 and not mis["same"] and mis["equal"], mis
        assert mis["shape"] == [4, 4] and mis["dtype"] == f"torch.{name}", mis
        assert out[f"{name}_aligned_is_itself"], name
    assert out["empty_is_itself"]


def test_tensorflow_gets_aligned_buffers_zero_copy_where_it_can(tmp_path):
    _needs("keras", "tensorflow")
    proc = _run(tmp_path, "tensorflow", _TF_SCRIPT)
    out = _result(proc)  # printed before the control ran: none of the bridged cases aborted

    f32, want = out["f32_offset1"], out["f32_offset1_expected"]
    assert f32["copied"] and f32["copy_mod"] == 0, f32
    assert f32["sum"] == want["sum"] and f32["matmul"] == want["matmul"]  # small integers: exact
    assert out["f32_offset16_zero_copy"], "an aligned float32 view must reach TF without a copy"
    assert out["graph_matmul"] == want["matmul"]

    rows = out["buckets16"]
    # The planner pads every view to 64 bytes whatever the dtype (shoal.core.buckets.align_numel): all aligned.
    assert len(rows) == 12 and all(r["aligned"] for r in rows), rows
    for r in rows:
        # zero-copy exactly where the engine's view starts on 64 bytes (everywhere, as planned)
        assert r["zero_copy"] == r["aligned"], r
        assert r["equal"], r
        # 16-bit values summed in float32 (TF) and float32 (torch), the same order: within 1e-5 relative
        assert r["sum_tf"] == pytest.approx(r["sum_torch"], rel=1e-5, abs=1e-5), r

    # the control: without the bridge, TF aborts on the same view (the check above tests the real thing)
    assert "CONTROL-START" in proc.stdout and "CONTROL-SURVIVED" not in proc.stdout, proc.stdout
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-2000:])
    assert "IsAligned" in proc.stderr, proc.stderr[-2000:]
