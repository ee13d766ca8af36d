"""``shoal.tensorflow.elastic`` on one process: the states save, restore and commit TensorFlow variables (the
optimizer's slot variables included), a TF1 ``session`` or a missing variable list is refused with the fix, and
``hvd.elastic.*`` is reachable after ``import shoal.tensorflow as hvd``.

The checks import TensorFlow, so they run in one fresh interpreter (as tests/unit/test_tensorflow_surface.py
does); a worker killed under the launcher is tests/launcher/test_tf_elastic.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"

_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf
import keras
import shoal.tensorflow as hvd

out = {"names": [n for n in ("run", "TensorFlowState", "TensorFlowKerasState", "ObjectState", "State")
                 if not hasattr(hvd.elastic, n)]}


def err(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


out["session"] = err(lambda: hvd.elastic.TensorFlowState([tf.Variable(1.0)], session=object()))
out["no_vars"] = err(lambda: hvd.elastic.TensorFlowState())
out["unbuilt"] = err(lambda: hvd.elastic.TensorFlowKerasState(keras.Sequential([keras.layers.Dense(2)])))
hvd.init()

# TensorFlowState: Horovod's test_elastic_state, on one rank.
w = tf.Variable(np.ones((2, 2)))
b = tf.Variable(np.ones(2), dtype=tf.float64)
state = hvd.elastic.TensorFlowState([w, b], batch=20, epoch=10)
state.sync()
w.assign([[1.0, 2.0], [3.0, 4.0]]); b.assign([0.0, 0.0]); state.batch, state.epoch = 21, 11
state.restore()
out["restored"] = [w.numpy().tolist(), b.numpy().tolist(), state.batch, state.epoch]
w.assign([[1.0, 2.0], [3.0, 4.0]]); b.assign([0.0, 0.0]); state.batch, state.epoch = 21, 11
state.commit()
w.assign(tf.zeros((2, 2), tf.float64)); state.batch = 99
state.restore()
out["committed"] = [w.numpy().tolist(), b.numpy().tolist(), state.batch, state.epoch]

# TensorFlowKerasState: Adam's moments and iterations are kept too.
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
opt = keras.optimizers.Adam(0.1)
kstate = hvd.elastic.TensorFlowKerasState(model, opt, batch=0)
n_opt_vars = len(opt.variables)
x, y = tf.ones((4, 3)), tf.zeros((4, 2))


def step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))


step()
kstate.batch = 1
kstate.commit()
saved = [v.numpy().copy() for v in model.variables + list(opt.variables)]
step(); step()
kstate.batch = 3
kstate.restore()
now = [v.numpy() for v in model.variables + list(opt.variables)]
out["keras"] = {"opt_vars": n_opt_vars, "iterations": int(opt.iterations.numpy()), "batch": kstate.batch,
                "equal": all(np.array_equal(a, b) for a, b in zip(saved, now))}

# run in a world of one: the function just runs (the state synced first).
calls = []


@hvd.elastic.run
def train(state, k):
    calls.append(k)
    return state.batch + k


out["run"] = [train(kstate, 2), calls]
print("RESULT " + json.dumps(out))
"""


def test_tensorflow_elastic_states_on_one_process():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'shoal[tensorflow]')")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    for name in [k for k in env if k.startswith(("SHOAL_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))]:
        env.pop(name)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=180,
                          start_new_session=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["names"] == [], out["names"]
    assert out["session"].startswith("ValueError") and "eager" in out["session"], out["session"]
    assert "HINT: drop session=" in out["session"], out["session"]
    assert out["no_vars"].startswith("ValueError") and "HINT" in out["no_vars"], out["no_vars"]
    assert out["unbuilt"].startswith("ValueError") and "model.build" in out["unbuilt"], out["unbuilt"]
    assert out["restored"] == [[[1.0, 1.0], [1.0, 1.0]], [1.0, 1.0], 20, 10]
    assert out["committed"] == [[[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0], 21, 11]
    # iterations, learning rate, and a first and second moment for each of the kernel and the bias
    assert out["keras"]["opt_vars"] >= 6, out["keras"]
    assert out["keras"] == {**out["keras"], "iterations": 1, "batch": 1, "equal": True}, out["keras"]
    assert out["run"] == [3, [2]], out["run"]
