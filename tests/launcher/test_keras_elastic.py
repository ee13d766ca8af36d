"""Elastic Keras through the real ``shoal run --min-np/--max-np``: ``model.fit`` under ``hvd.elastic.run``
with Horovod's three state callbacks survives a worker SIGKILLed in the middle of an epoch, on the
TensorFlow, PyTorch and JAX backends of Keras 3.

What it proves, per backend: the survivors' ``fit`` fails with the engine's error even where the backend
wraps it (TensorFlow's ``UnknownError`` around the host call, JAX's runtime error), the job goes on in a
new generation, a replacement joins at a commit and is caught up from rank 0 (bitwise the same weights at
the end on every worker), and the job exits 0 with the recovery in the launcher's summary. Each backend is
skipped, with the reason, when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap

import pytest

from elastic_job import events as _events  # tests/launcher is on sys.path (rootdir-relative imports)

pytestmark = pytest.mark.timeout(300)

_JOB = textwrap.dedent('''
    import json, os, sys, time, signal
    import numpy as np
    import keras
    import shoal.keras as hvd
    from shoal.core import runtime as _rt

    victim, at = int(sys.argv[1]), int(sys.argv[2])
    hvd.init()
    wid = int(os.environ["SHOAL_ELASTIC_ID"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 3))).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.5)), loss="mse")
    state = hvd.elastic.KerasState(model, epoch=0, batch=0, steps=0)

    def say(**kw):
        print("EVENT " + json.dumps({"wid": wid, "rank": hvd.rank(), "size": hvd.size(),
                                     "gen": _rt.generation(), "t": time.time(), **kw}), flush=True)

    class Fault(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if wid == victim and state.steps == at:
                say(what="fault")
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, batch, logs=None):
            state.steps += 1
            say(what="step", steps=state.steps, epoch=state.epoch, batch=state.batch)
            # In the last epoch, wait (bounded) for the replacement: it takes part in the end.
            while state.steps > at and hvd.size() < 3 and state.epoch == 2 and time.time() - t0 < 100:
                time.sleep(0.2)
                state.check_host_updates()

    callbacks = [hvd.callbacks.MetricAverageCallback(), hvd.elastic.UpdateEpochStateCallback(state),
                 hvd.elastic.UpdateBatchStateCallback(state), Fault(), hvd.elastic.CommitStateCallback(state, 2)]

    @hvd.elastic.run
    def train(state):
        say(what="start", epoch=state.epoch, steps=state.steps)
        model.fit(x, y, batch_size=16, steps_per_epoch=4, epochs=4 - state.epoch, callbacks=callbacks,
                  verbose=0, shuffle=False)

    t0 = time.time()
    train(state)
    w = np.concatenate([np.ravel(v) for v in model.get_weights()])
    say(what="done", steps=state.steps, epoch=state.epoch, weights=w.tolist(),
        iterations=int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
''')

_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "OMP_NUM_THREADS": "1", "SHOAL_TIMEOUT_S": "30", "SHOAL_ELASTIC_TIMEOUT_S": "3"}


# JAX runs the same path as the other two backends (one more ~25 s launch): it runs where asked for, so that the
# default suite stays within its time budget on 2 cores (issue 17 asks for TensorFlow and torch).
_JAX = pytest.mark.skipif(os.environ.get("SHOAL_TEST_JAX_ELASTIC") != "1",
                          reason="set SHOAL_TEST_JAX_ELASTIC=1 to run Keras fit on JAX under a killed worker too")


@pytest.mark.parametrize("backend", ["tensorflow", "torch", pytest.param("jax", marks=_JAX)])
def test_fit_survives_a_killed_worker(run_cli, tmp_path, backend):
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed, needed for Keras' {backend} backend")
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    r = run_cli(["run", "-np", "3", "--min-np", "2", "--max-np", "3", "python", str(script), "1", "3"],
                timeout_s=280, env={**_ENV, "KERAS_BACKEND": backend})
    assert r.returncode == 0, r.describe()
    assert "recovered from 1 failure(s): worker 1 (killed by SIGKILL" in r.stderr, r.stderr
    ev = _events(r.stdout)
    assert any(e["what"] == "fault" for e in ev), r.describe()
    done = [e for e in ev if e["what"] == "done"]
    assert len(done) == 3 and {e["size"] for e in done} == {3}, r.describe()
    assert any(e["wid"] >= 3 for e in done), done  # the replacement finished with the others ...
    assert len({json.dumps(e["weights"]) for e in done}) == 1, [e["weights"][:3] for e in done]  # ... caught up
    assert {e["epoch"] for e in done} == {4}, done
    # The optimizer's step counter is part of the state too: after the recovery it matches the steps trained
    # on every worker, the replacement's included (a counter one ahead would shift every schedule).
    counts = {(e["steps"], e["iterations"]) for e in done}
    assert len(counts) == 1 and all(s == i for s, i in counts), [(e["wid"], e["steps"], e["iterations"])
                                                                 for e in done]
