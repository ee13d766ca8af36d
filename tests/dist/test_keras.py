"""``shoal.keras`` on 2 real gloo ranks, for each Keras backend (tensorflow, jax, torch).

One ``run_ranks`` launch per backend does every check (importing TensorFlow costs 5-30 s per rank on this
machine): each rank fits small models with ``model.fit`` and returns the final weights; rank 0 also fits
the single-process reference on the concatenated batches. Each backend is skipped, with the reason, when
Keras or the backend is not installed (``pip install 'shoal[tensorflow]'`` / ``'shoal[jax]'`` /
``'shoal[keras]'``); the errors of an environment without them are tested in
tests/unit/test_keras_imports.py.

What each case proves:
- ``plain``: SGD with momentum; rank 1 starts from other weights, BroadcastGlobalVariablesCallback fixes
  that; weights identical across ranks (bitwise) and equal to the reference.
- ``lso``: DistributedOptimizer(LossScaleOptimizer(SGD)): under JAX this is the path that bypasses
  ``apply``. Rank 1's first batch holds a target of 1e36, so only rank 1's local gradients overflow; the
  step must be skipped on both ranks alike (the finite check runs after the reduction) and the loss scale
  halved on both, as in the reference.
- ``accum``: ``backward_passes_per_step=2`` (Keras' gradient_accumulation_steps): one reduction per
  update, equal to the reference fit with the same accumulation on the concatenated micro-batches;
  ``eager_accum`` the same with ``run_eagerly=True`` (TF, JAX).
- ``lso_accum``: accumulation inside a loss-scale optimizer: every micro-batch reduced (docs/keras.md).
- ``fp16``: fp16 wire compression, 2 steps per compiled call (TF/JAX): identical across ranks, close to
  the reference.
- ``nan_skip`` / ``nan_raise``: the engine's NaN check; rank 1's first batch has an Inf target: ``skip``
  skips that step on both ranks (equal to the reference without that batch; ``skipped_steps`` is 1),
  ``raise`` raises on both ranks, naming rank 1, step 1 and the gradients by their variable paths.
- ``freeze`` (TF, torch): one optimizer through three epochs, the first layer frozen in the second: equal
  to the reference; torch's backward hooks follow the new set of variables (and back).
- ``wrong_lso``: LossScaleOptimizer(DistributedOptimizer(SGD)) without any Shoal callback: the first
  apply raises on both ranks with the right order in the HINT.
- callbacks: MetricAverageCallback averages the epoch logs; LearningRateWarmupCallback sets Horovod's rates.
- settings that differ across ranks (``nan_check`` by argument or by a LossScaleOptimizer on one rank,
  compression): the first apply raises the same MismatchError on both ranks instead of hanging (torch
  backend only: the check is host code, the same under every backend); variable paths that differ
  (Keras numbers layers per process) are not a mismatch.
- collectives on backend tensors, eager and inside the backend's compiled function; a Python list is
  accepted, a value that is no tensor (on one rank) fails both ranks with Shoal's errors.
- the step owner on Keras (as on torch): a variable only rank 0 has a gradient for (the others' average
  with zeros from rank 1, against a numpy reference, ranks bitwise equal); uneven batch counts with
  ``hvd.join()`` after ``fit`` (rank 0's last steps average with the joined rank's zeros, numpy reference);
  a rank that stops calling ``fit`` is named by the stall inspector within the stall timeout.

Tolerances. fp32: the distributed gradient is ``(mean(half0) + mean(half1)) / 2``, the reference one
``mean(half0 ++ half1)``: the same sum in another order, a few ulps per element; after 4 SGD steps with
lr 0.1 on weights of scale ~1 the measured differences are ~1e-7, ``_ATOL = 1e-5`` leaves room for another
summation order in the backend's kernels. fp16 wire: each gradient element is rounded to 11 bits (relative
4.9e-4) before the sum; 4 steps of lr 0.1 on gradients of scale <= 1 move weights by < 4 * 0.1 * 4.9e-4 *
(1 + momentum); ``_ATOL_FP16 = 2e-3``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from shoal.testing import run_ranks

_ATOL = 1e-5
_ATOL_FP16 = 2e-3
_STEPS = 4
_LOCAL = 8          # local batch per rank; the reference's batch is 2 * _LOCAL
_IN, _HID, _OUT = 8, 16, 4

# 2 ranks on 2 cores: one compute thread each (the host call also runs with TF_NUM_INTEROP_THREADS=1).
_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "OMP_NUM_THREADS": "1"}


def _needs(backend: str) -> None:
    """Skip (with the reason) when keras or the backend is missing. ``find_spec`` rather than
    ``pytest.importorskip``: importing TensorFlow or JAX here would cost the pytest process 5-30 s for
    nothing (the ranks import them)."""
    extra = {"tensorflow": "tensorflow", "jax": "jax", "torch": "keras"}[backend]
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed, needed for Keras' {backend} backend "
                        f"(pip install 'shoal[{extra}]')")


# ----------------------------------------------------------------------------------------- rank side

def _data(world: int):
    """Global data: _STEPS global batches of world * _LOCAL rows; and rank r's rows of each batch."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((_STEPS * world * _LOCAL, _IN)).astype("float32")
    y = rng.standard_normal((_STEPS * world * _LOCAL, _OUT)).astype("float32")
    return x, y


def _local(a: np.ndarray, rank: int, world: int, micro: int = _LOCAL) -> np.ndarray:
    """Rank ``rank``'s share: of every global (micro-)batch of ``world * micro`` rows, its own ``micro``."""
    blocks = a.reshape(-1, world, micro, *a.shape[1:])
    return blocks[:, rank].reshape(-1, *a.shape[1:])


def _weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((_IN, _HID)).astype("float32") * 0.5, np.zeros(_HID, "float32"),
            rng.standard_normal((_HID, _OUT)).astype("float32") * 0.5, np.zeros(_OUT, "float32")]


def _model(keras, seed: int = 0):
    model = keras.Sequential([keras.Input((_IN,)), keras.layers.Dense(_HID, activation="tanh"),
                              keras.layers.Dense(_OUT)])
    model.set_weights(_weights(seed))
    return model


def _flat(model) -> np.ndarray:
    return np.concatenate([np.asarray(w).reshape(-1) for w in model.get_weights()])


def _fit(keras, opt, x, y, batch: int, callbacks=(), **compile_kw):
    model = _model(keras, seed=0)
    model.compile(optimizer=opt, loss="mse", **compile_kw)
    hist = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model, hist


def _rank_checks() -> dict:
    import keras
    import torch

    import shoal.keras as hvd

    torch.set_num_threads(1)
    backend = keras.backend.backend()
    r, n = hvd.rank(), hvd.size()
    x, y = _data(n)
    xl, yl = _local(x, r, n), _local(y, r, n)
    out: dict = {"backend": backend}
    bcast = hvd.callbacks.BroadcastGlobalVariablesCallback(0)

    # plain: rank 1 starts elsewhere; the broadcast callback must fix it.
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))
    model = _model(keras, seed=r)
    model.compile(optimizer=opt, loss="mse")
    model.fit(xl, yl, batch_size=_LOCAL, epochs=1, shuffle=False, verbose=0, callbacks=[bcast])
    out["plain"] = _flat(model)
    out["plain_stats"] = hvd.exchange_stats(opt)

    # lso: rank 1's first batch overflows locally; both ranks must skip that step.
    yp = y.copy()
    yp[_LOCAL] = 1e36  # first row of rank 1's part of global batch 0
    ypl = _local(yp, r, n)
    lso = hvd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    model, _ = _fit(keras, lso, xl, ypl, _LOCAL, [hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    out["lso"] = _flat(model)
    out["lso_scale"] = float(keras.ops.convert_to_numpy(lso.dynamic_scale))

    # accum: 2 micro-batches per update, reduced once per update.
    acc = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=2)
    model, _ = _fit(keras, acc, xl, yl, _LOCAL)
    out["accum"] = _flat(model)
    out["accum_stats"] = hvd.exchange_stats(acc)

    # the same, eager (run_eagerly=True: TF and JAX call the host function directly; torch is always eager)
    if backend != "torch":
        eacc = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=2)
        model, _ = _fit(keras, eacc, xl, yl, _LOCAL, run_eagerly=True)
        out["eager_accum"] = _flat(model)

    # lso_accum: accumulation inside a loss-scale optimizer: every micro-batch is reduced.
    lacc = hvd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)))
    model, _ = _fit(keras, lacc, xl, yl, _LOCAL)
    out["lso_accum"] = _flat(model)
    out["lso_accum_stats"] = hvd.exchange_stats(lacc)

    # fp16 wire compression; 2 steps per compiled call (the host call inside the backend's loop).
    f16 = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), compression=hvd.Compression.fp16)
    model, _ = _fit(keras, f16, xl, yl, _LOCAL, steps_per_execution=1 if backend == "torch" else 2)
    out["fp16"] = _flat(model)

    # callbacks: raw logs recorded before MetricAverageCallback, averaged after; warm-up rates per batch.
    raw, lrs = [], []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raw.append(float(logs["loss"]))

        def on_train_batch_begin(self, batch, logs=None):
            lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    warm = hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.2, warmup_epochs=1, steps_per_epoch=_STEPS)
    cb_opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))
    _, hist = _fit(keras, cb_opt, xl, yl, _LOCAL, [warm, Record(), hvd.callbacks.MetricAverageCallback()])
    out["raw_loss"], out["avg_loss"], out["lrs"] = raw[0], hist.history["loss"][0], lrs

    # collectives on backend tensors: eager, then inside the backend's compiled function.
    t = keras.ops.convert_to_tensor(np.full((3,), r + 1.0, "float32"))
    out["allreduce"] = keras.ops.convert_to_numpy(hvd.allreduce(t, op=hvd.Sum)).tolist()
    out["allgather"] = keras.ops.convert_to_numpy(
        hvd.allgather(keras.ops.convert_to_tensor(np.full((r + 1, 2), r, "float32")))).tolist()
    out["broadcast"] = keras.ops.convert_to_numpy(hvd.broadcast(t, root_rank=1)).tolist()
    out["compiled_allreduce"] = _compiled_allreduce(backend, hvd, t)
    # a Python list becomes a backend tensor (as Horovod's tf.constant); a value that cannot become one,
    # on rank 1 only, fails both ranks at once with Shoal's errors (rank 0 learns it from the exchange)
    out["allreduce_list"] = keras.ops.convert_to_numpy(hvd.allreduce([1.0, 2.0 * r], op=hvd.Sum)).tolist()
    try:
        hvd.allreduce({"loss": 1.0} if r == 1 else t, name="bad", op=hvd.Sum)
        out["bad_value"] = "no error"
    except Exception as exc:  # noqa: BLE001 (each rank reports what it raised)
        out["bad_value"] = f"{type(exc).__name__}: {exc}"

    if backend == "tensorflow":
        out.update(_tf_jit_checks(keras, hvd, xl, yl))

    # freeze: fit an epoch, freeze the first layer, fit, unfreeze, fit (one optimizer throughout). Keras'
    # JAX optimizer refuses a trainable set other than the one it was built with (stateless_apply checks
    # the length), so under JAX a changed set means a new optimizer, hence a new exchange: nothing to test.
    if backend != "jax":
        fopt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))
        out["freeze"] = _flat(_fit_freeze_unfreeze(keras, fopt, xl, yl, _LOCAL))
        out["freeze_stats"] = hvd.exchange_stats(fopt)

    # wrong way round: a LossScaleOptimizer around a DistributedOptimizer, no Shoal callback to catch it
    # at the start of fit: the first apply must raise, on every rank, before any collective.
    wrong = keras.optimizers.LossScaleOptimizer(hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)))
    try:
        _fit(keras, wrong, xl, yl, _LOCAL)
        out["wrong_lso"] = ""
    except Exception as exc:  # noqa: BLE001 (the message is what we check)
        out["wrong_lso"] = f"{type(exc).__name__}: {exc}"

    # NaN check: rank 1's first batch has an Inf target. skip: that step is skipped on both ranks.
    yi = y.copy()
    yi[_LOCAL] = np.inf
    yil = _local(yi, r, n)
    skip_opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), nan_check="skip")
    model, _ = _fit(keras, skip_opt, xl, yil, _LOCAL)
    out["nan_skip"] = _flat(model)
    out["nan_skip_stats"] = hvd.exchange_stats(skip_opt)

    # raise: every rank raises, naming the rank, the step and the gradients (before the references, so
    # that rank 1 does not wait in this collective while rank 0 fits them).
    model = _model(keras, seed=0)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), nan_check="raise"), loss="mse")
    out["nan_raise_paths"] = [v.path for v in model.trainable_variables]
    try:
        model.fit(xl, yil, batch_size=_LOCAL, epochs=1, shuffle=False, verbose=0)
        out["nan_raise"] = ""
    except Exception as exc:  # noqa: BLE001 (the message is what we check)
        out["nan_raise"] = f"{type(exc).__name__}: {exc}"

    # the single-process references, on the concatenated batches (rank 0 only: rank 1 leaves the core free)
    if r == 0:
        model, _ = _fit(keras, keras.optimizers.SGD(0.1, momentum=0.9), x, y, n * _LOCAL)
        out["ref_plain"] = _flat(model)
        ref_lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        model, _ = _fit(keras, ref_lso, x, yp, n * _LOCAL)
        out["ref_lso"] = _flat(model)
        out["ref_lso_scale"] = float(keras.ops.convert_to_numpy(ref_lso.dynamic_scale))
        model, _ = _fit(keras, keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), x, y, n * _LOCAL)
        out["ref_accum"] = _flat(model)
        ref_lacc = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))
        model, _ = _fit(keras, ref_lacc, x, y, n * _LOCAL)
        out["ref_lso_accum"] = _flat(model)
        model, _ = _fit(keras, keras.optimizers.SGD(0.1), x[n * _LOCAL:], y[n * _LOCAL:], n * _LOCAL)
        out["ref_nan_skip"] = _flat(model)  # the poisoned first batch left out
        if backend != "jax":
            out["ref_freeze"] = _flat(_fit_freeze_unfreeze(keras, keras.optimizers.SGD(0.1, momentum=0.9),
                                                           x, y, n * _LOCAL))

    out.update(_keras_faults(keras, hvd, backend, r, n, x, y))  # last: its stall case leaves rank 0 broken
    return out


def _linear_weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((_IN, _OUT)).astype("float32") * 0.5, np.zeros(_OUT, "float32")]


def _np_mse_grads(x: np.ndarray, out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(mean((out - y)^2)) / d(out), Keras' mse over a batch: 2 (out - y) / (rows * columns)."""
    return 2.0 * (out - y) / out.size


def _np_partial_reference(x, y, n: int, steps: int) -> list[np.ndarray]:
    """Plain SGD(0.1) on ``body(x) + extra(x)`` for rank 0 and ``body(x)`` for rank 1, the gradients averaged
    over both ranks with zeros from rank 1 for ``extra`` (the negotiation's "some ranks produced it")."""
    wb, bb = _linear_weights(1)
    we, be = _linear_weights(2)
    wb, bb, we, be = (a.astype("float64") for a in (wb, bb, we, be))
    for s in range(steps):
        grads = {k: 0.0 for k in ("wb", "bb", "we", "be")}
        for rank in range(n):
            rows = slice((s * n + rank) * _LOCAL, (s * n + rank + 1) * _LOCAL)
            xs, ys = x[rows].astype("float64"), y[rows].astype("float64")
            out = xs @ wb + bb + ((xs @ we + be) if rank == 0 else 0.0)
            d = _np_mse_grads(xs, out, ys)
            grads["wb"] += xs.T @ d / n
            grads["bb"] += d.sum(0) / n
            if rank == 0:
                grads["we"] += xs.T @ d / n
                grads["be"] += d.sum(0) / n
        wb, bb, we, be = wb - 0.1 * grads["wb"], bb - 0.1 * grads["bb"], we - 0.1 * grads["we"], be - 0.1 * grads["be"]
    return [wb, bb, we, be]


def _np_join_reference(x, y, n: int, batches: list[int]) -> list[np.ndarray]:
    """Plain SGD(0.1) on one Dense layer; in step s only the ranks with a batch left contribute, and the
    sum still divides by n (a joined rank contributes zeros, Horovod's semantics)."""
    w, b = (a.astype("float64") for a in _linear_weights(3))
    for s in range(max(batches)):
        gw, gb = 0.0, 0.0
        for rank in range(n):
            if s >= batches[rank]:
                continue
            rows = slice((s * n + rank) * _LOCAL, (s * n + rank + 1) * _LOCAL)
            xs, ys = x[rows].astype("float64"), y[rows].astype("float64")
            d = _np_mse_grads(xs, xs @ w + b, ys)
            gw, gb = gw + xs.T @ d / n, gb + d.sum(0) / n
        w, b = w - 0.1 * gw, b - 0.1 * gb
    return [w, b]


def _keras_faults(keras, hvd, backend: str, r: int, n: int, x, y) -> dict:
    """The per-step negotiation, the stall inspector and join on Keras (through the step owner, as on
    torch): a variable only rank 0 has a gradient for, uneven batch counts with join, a rank that stops
    calling fit."""
    import os
    import tempfile
    import time

    from shoal.core import runtime

    out: dict = {}

    # 1. rank 1's model never uses `extra` (TF and torch: its gradient is None there; JAX: zeros): rank 1
    # applies the average with zeros from itself, so the ranks stay equal (plain SGD, a numpy reference).
    class TwoHeads(keras.Model):
        def __init__(self, use_extra: bool):
            super().__init__()
            self.body, self.extra, self.use_extra = keras.layers.Dense(_OUT), keras.layers.Dense(_OUT), use_extra

        def call(self, inputs):
            y_ = self.body(inputs)
            return y_ + self.extra(inputs) if self.use_extra else y_

    model = TwoHeads(r == 0)
    model.body.build((None, _IN))
    model.extra.build((None, _IN))  # on rank 1 too: the same variables everywhere, one of them unused
    model.body.set_weights(_linear_weights(1))
    model.extra.set_weights(_linear_weights(2))
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    model.fit(_local(x, r, n), _local(y, r, n), batch_size=_LOCAL, epochs=1, shuffle=False, verbose=0)
    out["partial"] = np.concatenate([np.asarray(w).reshape(-1) for w in
                                     model.body.get_weights() + model.extra.get_weights()])
    out["ref_partial"] = np.concatenate([w.reshape(-1) for w in _np_partial_reference(x, y, n, _STEPS)])

    # 2. uneven batch counts: rank 1 has 2 batches, rank 0 all 4; both call join() after fit. Rank 0's
    # last two steps average with rank 1's zeros; then both take the last rank's weights.
    batches = [_STEPS, _STEPS // 2]
    dense = keras.Sequential([keras.Input((_IN,)), keras.layers.Dense(_OUT)])
    dense.set_weights(_linear_weights(3))
    dense.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    rows = batches[r] * n * _LOCAL
    dense.fit(_local(x[:rows], r, n), _local(y[:rows], r, n), batch_size=_LOCAL, epochs=1, shuffle=False,
              verbose=0)
    out["join_last"] = hvd.join()
    out["join_fitted"] = _flat(dense)
    hvd.broadcast_variables(dense.variables, root_rank=out["join_last"])
    out["join"] = _flat(dense)
    out["ref_join"] = np.concatenate([w.reshape(-1) for w in _np_join_reference(x, y, n, batches)])

    # 3. rank 1 stops calling fit after one batch (busy elsewhere): rank 0 fails at the stall timeout,
    # naming rank 1, instead of waiting out the process-group timeout. A short stall timeout for this
    # case only (the launch's otherwise lets TensorFlow trace at its own pace).
    cfg = runtime.config()
    cfg.stall_warning_s, cfg.stall_timeout_s = 1.0, 4.0
    stalled = keras.Sequential([keras.Input((_IN,)), keras.layers.Dense(_OUT)])
    stalled.set_weights(_linear_weights(3))
    stalled.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    # Both ranks are children of one test process: rank 0 leaves a mark there once it has failed.
    named = os.path.join(tempfile.gettempdir(), f"shoal-keras-stall-{os.getppid()}")
    start = time.monotonic()
    try:
        rows = (_STEPS if r == 0 else 1) * n * _LOCAL
        stalled.fit(_local(x[:rows], r, n), _local(y[:rows], r, n), batch_size=_LOCAL, epochs=1,
                    shuffle=False, verbose=0)
        if r == 1:  # busy: never reaches the next step's collectives, until rank 0 has failed (30 s at most)
            while not os.path.exists(named) and time.monotonic() - start < 30:
                time.sleep(0.1)
            if os.path.exists(named):
                os.unlink(named)
        out["stall"] = ""
    except Exception as exc:  # noqa: BLE001 (TF and JAX wrap what a host call raised; the text is kept)
        out["stall"] = f"{type(exc).__name__}: {exc}"
        with open(named, "w"):
            pass
    out["stall_s"] = time.monotonic() - start
    return out


def _fit_freeze_unfreeze(keras, opt, x, y, batch: int):
    """Three epochs: all layers, the first layer frozen (recompiled, as Keras asks after changing
    ``trainable``), unfrozen again; the same optimizer object throughout."""
    model = _model(keras, seed=0)
    for trainable in (True, False, True):
        model.layers[0].trainable = trainable
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


def _compiled_allreduce(backend: str, hvd, t):
    import keras

    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda v: hvd.allreduce(v, op=hvd.Sum) * 2)
    elif backend == "jax":
        import jax

        fn = jax.jit(lambda v: hvd.allreduce(v, op=hvd.Sum) * 2)
    else:
        return keras.ops.convert_to_numpy(hvd.allreduce(t, op=hvd.Sum) * 2).tolist()
    return keras.ops.convert_to_numpy(fn(t)).tolist()


def _tf_jit_checks(keras, hvd, xl, yl) -> dict:
    """jit_compile=True: the callbacks rebuild the train step without XLA; without them, a clear error."""
    out = {}
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1))
    model, _ = _fit(keras, opt, xl, yl, _LOCAL, [hvd.callbacks.BroadcastGlobalVariablesCallback(0)],
                    jit_compile=True)
    out["jit_weights"] = _flat(model)
    out["jit_still_on"] = bool(model.jit_compile)
    try:
        _fit(keras, hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), xl, yl, _LOCAL, jit_compile=True)
        out["jit_error"] = ""
    except Exception as exc:  # noqa: BLE001 (the message is what we check)
        out["jit_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------------------- test side

@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
@pytest.mark.timeout(240)
def test_keras_fit_matches_single_process(backend):
    _needs(backend)
    r0, r1 = run_ranks(_rank_checks, world_size=2, timeout_s=200, pg_timeout_s=60,
                       env={**_ENV, "KERAS_BACKEND": backend})
    assert r0["backend"] == r1["backend"] == backend

    # identical across ranks, bitwise, and equal to the single-process reference
    fitted = ("plain", "lso", "accum", "lso_accum", "nan_skip") + (("freeze",) if backend != "jax" else ())
    for case in fitted + ("fp16",):
        np.testing.assert_array_equal(r0[case], r1[case], err_msg=f"{case}: ranks differ")
    for case in fitted:
        np.testing.assert_allclose(r0[case], r0[f"ref_{case}"], rtol=0, atol=_ATOL, err_msg=case)
    np.testing.assert_allclose(r0["fp16"], r0["ref_plain"], rtol=0, atol=_ATOL_FP16)
    assert np.abs(r0["plain"] - _weights_flat(0)).max() > 100 * _ATOL, "plain: the weights did not move"

    # loss scaling: the overflowing step was skipped on both ranks (scale halved once, like the reference)
    assert r0["lso_scale"] == r1["lso_scale"] == r0["ref_lso_scale"] == 2.0 ** 14

    # accumulation: 4 micro-batches, 2 updates, 2 reductions
    assert r0["plain_stats"]["reductions"] == _STEPS
    assert r0["accum_stats"]["reductions"] == _STEPS // 2
    assert r0["lso_accum_stats"]["reductions"] == _STEPS
    if backend != "torch":
        np.testing.assert_array_equal(r0["eager_accum"], r1["eager_accum"])
        np.testing.assert_allclose(r0["eager_accum"], r0["ref_accum"], rtol=0, atol=_ATOL)
    if backend == "torch":  # from step 2 on, gradients were marked ready from backward hooks (overlap)
        assert r0["plain_stats"]["hooked"] == (_STEPS - 1) * 4

    # callbacks
    assert r0["avg_loss"] == pytest.approx((r0["raw_loss"] + r1["raw_loss"]) / 2, rel=1e-12)
    assert r0["avg_loss"] == r1["avg_loss"] and r0["raw_loss"] != r1["raw_loss"]
    expected = [0.2 / 2 * (b / _STEPS * (2 - 1) / 1 + 1) for b in range(_STEPS)]
    assert r0["lrs"] == pytest.approx(expected, rel=1e-6)

    # collectives on backend tensors
    assert r0["allreduce"] == r1["allreduce"] == [3.0] * 3
    assert r0["allgather"] == r1["allgather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert r0["broadcast"] == r1["broadcast"] == [2.0] * 3
    assert r0["compiled_allreduce"] == r1["compiled_allreduce"] == [6.0] * 3
    assert r0["allreduce_list"] == r1["allreduce_list"] == [2.0, 2.0]
    assert r1["bad_value"].startswith("TypeError") and "allreduce of 'bad'" in r1["bad_value"], r1["bad_value"]
    assert "got dict" in r1["bad_value"] and "HINT" in r1["bad_value"], r1["bad_value"]
    assert r0["bad_value"].startswith("MismatchError") and "rank 1 rejected" in r0["bad_value"], r0["bad_value"]

    # freezing: a second reducer for the smaller set, hooks re-registered for it (torch), and the first
    # reducer reused, clean, after unfreezing. Hooked gradients (torch): every step but the first of each
    # epoch, 4 tensors, then 2 (the first layer frozen), then 4; the old hooks' marks on the step where
    # the set changes are discarded, not counted.
    if backend != "jax":
        assert r0["freeze_stats"]["reducers"] == 2 and r0["freeze_stats"]["reductions"] == 3 * _STEPS
    if backend == "torch":
        assert r0["freeze_stats"]["hooked"] == (_STEPS - 1) * (4 + 2 + 4)

    # the wrong way round: raised at the first apply, with the right order in the HINT
    for res in (r0, r1):
        assert "inside a LossScaleOptimizer" in res["wrong_lso"] and "HINT" in res["wrong_lso"] and \
            "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt))" in res["wrong_lso"], res["wrong_lso"]

    # NaN check: skip counted once on both ranks; raise names the rank, the step (the first, as the
    # engine counts reductions of this optimizer) and the gradients, identically on both ranks
    assert r0["nan_skip_stats"]["skipped_steps"] == r1["nan_skip_stats"]["skipped_steps"] == 1
    assert r0["plain_stats"]["skipped_steps"] == 0
    for res in (r0, r1):
        msg = res["nan_raise"]
        assert "non-finite gradients" in msg and "at step 1," in msg and "on rank 1:" in msg, msg
        assert any(f"'{path}'" in msg for path in res["nan_raise_paths"]), (msg, res["nan_raise_paths"])

    # negotiation, join and the stall inspector on Keras (the step owner, as on torch)
    np.testing.assert_array_equal(r0["partial"], r1["partial"], err_msg="partial: ranks differ")
    np.testing.assert_allclose(r0["partial"], r0["ref_partial"], rtol=0, atol=_ATOL)
    assert r0["join_last"] == r1["join_last"] == 0
    np.testing.assert_allclose(r0["join_fitted"], r0["ref_join"], rtol=0, atol=_ATOL)
    np.testing.assert_array_equal(r0["join"], r1["join"])
    stall = r0["stall"]
    assert "rank 0 has waited" in stall and "rank 1 has not reached synchronize() of this step" in stall, stall
    assert "rank 1 never reached a collective" in stall and "HINT" in stall, stall
    assert r0["stall_s"] < 30, r0["stall_s"]
    assert r1["stall"] == "", r1["stall"]

    if backend == "tensorflow":
        np.testing.assert_array_equal(r0["jit_weights"], r1["jit_weights"])
        assert r0["jit_still_on"], "prepare_model must leave model.jit_compile as the user set it"
        assert "jit_compile=False" in r0["jit_error"] and "HINT" in r0["jit_error"], r0["jit_error"]


def _weights_flat(seed: int) -> np.ndarray:
    return np.concatenate([w.reshape(-1) for w in _weights(seed)])


# ------------------------------------------------------------------- ranks that disagree: a named error

def _rank_settings_differ() -> dict:
    """SHOAL_NAN_CHECK=raise on both ranks; rank 1 differs in one way per case. Each case's first apply
    must raise the same MismatchError on both ranks (before this check, rank 0 waited in the NaN-flag
    allreduce that rank 1 never starts, until the process-group timeout)."""
    import keras
    import torch

    import shoal.keras as hvd
    from shoal.core.errors import MismatchError

    torch.set_num_threads(1)
    r, n = hvd.rank(), hvd.size()
    x, y = _data(n)
    xl, yl = _local(x, r, n), _local(y, r, n)
    sgd = keras.optimizers.SGD
    cases = {
        "argument": lambda: hvd.DistributedOptimizer(sgd(0.1), nan_check="off" if r else None),
        "lso": lambda: hvd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(sgd(0.1)) if r else sgd(0.1)),
        "compression": lambda: hvd.DistributedOptimizer(
            sgd(0.1), compression=hvd.Compression.fp16 if r else hvd.Compression.none),
    }
    out: dict = {}
    for case, make in cases.items():
        try:
            _fit(keras, make(), xl, yl, _LOCAL)
            out[case] = ""
        except MismatchError as exc:
            out[case] = str(exc)
    # The same settings, but rank 1 built one more layer first: its variable paths differ (dense_3 vs
    # dense_2). Compared by position, that is no mismatch; and the ranks are still aligned after the errors.
    if r:
        keras.layers.Dense(2)
    opt = hvd.DistributedOptimizer(sgd(0.1))
    model, _ = _fit(keras, opt, xl, yl, _LOCAL)
    out["paths"] = [v.path for v in model.trainable_variables]
    out["after"] = _flat(model)
    out["after_stats"] = hvd.exchange_stats(opt)
    return out


@pytest.mark.timeout(120)
def test_keras_ranks_with_different_settings_fail_with_a_named_error():
    """One backend is enough: the check runs on the host, the same code under every backend; torch starts
    fastest."""
    _needs("torch")
    results = run_ranks(_rank_settings_differ, world_size=2, timeout_s=100, pg_timeout_s=30,
                        env={**_ENV, "KERAS_BACKEND": "torch", "SHOAL_NAN_CHECK": "raise"})
    for res in results:
        for case in ("argument", "lso"):
            msg = res[case]
            assert "nan_check: rank 0: raise; rank 1: off" in msg and "HINT" in msg, (case, msg)
            assert "shoal.keras DistributedOptimizer" in msg and "'variable 0 (kernel)'" in msg, (case, msg)
        assert "LossScaleOptimizer turns nan_check off" in res["lso"]
        assert "compression: rank 0: none; rank 1: fp16" in res["compression"], res["compression"]
        assert "nan_check" not in res["compression"].split("HINT")[0], res["compression"]
        assert res["after_stats"]["reductions"] == _STEPS
    # the same message on both ranks, up to the tail where each names its own variable paths
    for case in ("argument", "lso", "compression"):
        assert results[0][case].split(" on rank 0: ")[0] == results[1][case].split(" on rank 1: ")[0], case
    assert results[0]["paths"] != results[1]["paths"]
    np.testing.assert_array_equal(results[0]["after"], results[1]["after"])
