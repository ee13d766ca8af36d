"""Elastic TensorFlow through the real ``shoal run -np 2 --min-np 1 --max-np 2``: a custom training loop
(``tf.function`` step with ``hvd.DistributedGradientTape``, Adam) under ``hvd.elastic.run`` with a
``TensorFlowState`` of the model's and the optimizer's variables survives worker 1 SIGKILLed mid-run.

What it proves: the survivor's step fails with the engine's error although TensorFlow wraps it (the host
call's ``UnknownError``), the job goes on in a new generation from no earlier than the last commit, a
replacement joins at a commit and is caught up from rank 0 (the optimizer's slot variables and step count
included), every worker ends with bitwise the same weights, and the job exits 0 with the recovery in the
launcher's summary. The run helpers are those of tests/launcher/test_keras_elastic.py.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from test_keras_elastic import _ENV, _events  # tests/launcher is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.timeout(240)

_STEPS, _AT, _EVERY = 16, 5, 3

_JOB = textwrap.dedent('''
    import json, os, sys, time, signal
    import numpy as np
    import tensorflow as tf
    import keras
    import shoal.tensorflow as hvd
    from shoal.core import runtime as _rt

    total, victim, at, every = (int(a) for a in sys.argv[1:5])
    hvd.init()
    wid = int(os.environ["SHOAL_ELASTIC_ID"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 2))).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(0.05)
    opt.build(model.trainable_variables)  # its moments exist before they are listed in the state

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    state = hvd.elastic.TensorFlowState(model.variables + opt.variables, epoch=0, batch=0, steps=0)

    def say(**kw):
        print("EVENT " + json.dumps({"wid": wid, "rank": hvd.rank(), "size": hvd.size(),
                                     "gen": _rt.generation(), "t": time.time(), **kw}), flush=True)

    @hvd.elastic.run
    def train(state):
        say(what="start", steps=state.steps)
        while state.steps < total:
            if wid == victim and state.steps == at:
                say(what="fault", steps=state.steps)
                os.kill(os.getpid(), signal.SIGKILL)
            # Near the end, wait (bounded) for the replacement: it takes part in the last steps.
            while state.steps >= total - every and hvd.size() < 2 and time.time() - t0 < 150:
                time.sleep(0.2)
                state.check_host_updates()
            lo = ((state.steps * hvd.size() + hvd.rank()) * 4) % 64
            step(x[lo:lo + 4], y[lo:lo + 4])
            state.steps += 1
            state.epoch, state.batch = divmod(state.steps, 8)
            if state.steps % every == 0:
                state.commit()
                say(what="commit", steps=state.steps)

    t0 = time.time()
    train(state)
    w = np.concatenate([np.ravel(v.numpy()) for v in model.variables])
    say(what="done", steps=state.steps, epoch=state.epoch, batch=state.batch,
        iterations=int(opt.iterations.numpy()), weights=w.tolist())
''')


def test_custom_loop_survives_a_killed_worker(run_cli, tmp_path):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'shoal[tensorflow]')")
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    r = run_cli(["run", "-np", "2", "--min-np", "1", "--max-np", "2", "python", str(script),
                 str(_STEPS), "1", str(_AT), str(_EVERY)],
                timeout_s=220, env={**_ENV, "KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0, r.describe()
    assert "recovered from 1 failure(s): worker 1 (killed by SIGKILL" in r.stderr, r.stderr
    ev = _events(r.stdout)
    fault = [e for e in ev if e["what"] == "fault"]
    assert len(fault) == 1 and fault[0]["steps"] == _AT, r.describe()
    # The peer was lost inside a traced step, which TF had partly run (the optimizer's step count): the
    # survivor went back to its last commit before the fault, no earlier (nothing committed is lost).
    survivor = [e for e in ev if e["wid"] == 0]
    restarts = [e for e in survivor if e["what"] == "start" and e["gen"] == 1]
    assert len(restarts) == 1, r.describe()
    assert restarts[0]["steps"] == _AT // _EVERY * _EVERY, (restarts, r.describe())
    assert "state restored to the last commit" in r.stdout + r.stderr, r.describe()
    done = [e for e in ev if e["what"] == "done"]
    assert len(done) == 2 and {e["size"] for e in done} == {2}, r.describe()
    assert {e["wid"] for e in done} == {0, 2}, done  # the survivor and the replacement
    assert len({json.dumps(e["weights"]) for e in done}) == 1, [e["weights"][:3] for e in done]  # bitwise
    # Every step was taken once from the job's point of view, and the optimizer's count (a slot variable,
    # copied to the replacement) agrees with it on both.
    assert [(e["steps"], e["epoch"], e["batch"], e["iterations"]) for e in done] == [(_STEPS, 2, 0, _STEPS)] * 2, done
