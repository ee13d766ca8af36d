"""TensorFlow synthetic-data throughput: ``shoal.tensorflow.DistributedGradientTape`` against TensorFlow's own
``MultiWorkerMirroredStrategy`` (MWMS), in the same processes and the same run.

The step is Horovod's ``examples/tensorflow2/tensorflow2_synthetic_benchmark.py``: a ``keras.applications`` model
on a random batch, SGD(0.01), inside ``tf.function``. Three modes take turns in interleaved rounds (the order
rotates each round), so that a busy neighbour hurts all of them alike:

    shoal   the tape wrapped in hvd.DistributedGradientTape, then opt.apply_gradients (Horovod's example)
    mwms    the same model built under MultiWorkerMirroredStrategy.scope(), the step run by strategy.run;
            Keras' optimizer all-reduces the gradients through TF's collective ops (gRPC ring on CPU)
    local   the plain tape, no communication: the compute floor

Each rank holds both models (same seed, same batch). Per mode: the median, p10 and p90 of the time per step
(per round, the slowest rank's), images/s over both ranks, and the ratio shoal/mwms of throughputs (>= 1:
Shoal at least level). The machine's load average is recorded before and after: on a shared machine the
absolute numbers move, the ratio of interleaved modes much less.

Run (the driver starts the two ranks with ``shoal run``; TF's gRPC servers listen on two free local ports)::

    python benchmarks/tf_synthetic.py                        # ResNet50, 64x64 images, batch 8 per rank
    python benchmarks/tf_synthetic.py --model MobileNetV2 --image-size 96 --rounds 5

Results: a table on the console and JSON under ``benchmarks/results/<date>-tf-synthetic.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ResNet50", help="a keras.applications model")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="images per rank and step")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (tracing included)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--threads", type=int, default=1, help="TF intra-op threads per rank")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ports", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------------------------------------ worker

def worker(args) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ports = [int(p) for p in args.ports.split(",")]
    # MWMS must exist before TensorFlow runs any op (it configures the collective runtime at start-up).
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": rank}})
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np
    import torch

    import shoal.tensorflow as hvd

    torch.set_num_threads(1)
    hvd.init()
    size = args.image_size
    rng = np.random.default_rng(rank)
    data = tf.constant(rng.random((args.batch_size, size, size, 3), dtype=np.float32))
    target = tf.constant(rng.integers(0, 1000, size=(args.batch_size, 1)))

    def build():
        keras.utils.set_random_seed(0)
        return getattr(keras.applications, args.model)(weights=None, input_shape=(size, size, 3)), \
            keras.optimizers.SGD(0.01)

    models = {}
    model, opt = build()

    @tf.function
    def shoal_step():
        with tf.GradientTape() as tape:
            probs = model(data, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(target, probs))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    models["shoal"] = shoal_step
    hvd.broadcast_variables(model.variables, root_rank=0)

    local_model, local_opt = build()

    @tf.function
    def local_step():
        with tf.GradientTape() as tape:
            probs = local_model(data, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(target, probs))
        grads = tape.gradient(loss, local_model.trainable_variables)
        local_opt.apply_gradients(zip(grads, local_model.trainable_variables))
        return loss

    models["local"] = local_step

    with strategy.scope():
        mw_model, mw_opt = build()

    @tf.function
    def mwms_step():
        def replica_step():
            with tf.GradientTape() as tape:
                probs = mw_model(data, training=True)
                # Keras' optimizer sums the replicas' gradients: scale to their average, as Horovod's does.
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(target, probs)) / world
            grads = tape.gradient(loss, mw_model.trainable_variables)
            mw_opt.apply_gradients(zip(grads, mw_model.trainable_variables))
            return loss
        return strategy.run(replica_step)

    models["mwms"] = mwms_step
    n_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))

    for name, step in models.items():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            hvd.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                models[name]()
            elapsed = (time.perf_counter() - start) / args.steps
            slowest = hvd.allreduce(tf.constant([elapsed], tf.float64), op=hvd.Max).numpy()[0]
            times[name].append(float(slowest))
    if rank == 0:
        Path(args.out).write_text(json.dumps({"times_s": times, "params": n_params,
                                              "tf": tf.__version__, "keras": keras.__version__}))


# ------------------------------------------------------------------------------------------------ driver

def main() -> int:
    args = _parser().parse_args()
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(HERE))
    from _results import save_report

    ports = _free_ports(args.np)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tf-synthetic-{os.getpid()}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": str(args.threads),
           "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": str(args.threads), "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, "-m", "shoal.runner.cli", "run", "-np", str(args.np), "python", str(Path(__file__)),
           "--worker", "--ports", ",".join(map(str, ports)), "--out", str(out), *argv]
    load_before = os.getloadavg()
    start = time.time()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    wall = time.time() - start
    load_after = os.getloadavg()
    got = json.loads(out.read_text())
    out.unlink()
    images = args.batch_size * args.np
    rows = {}
    for name, ts in got["times_s"].items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [med] * 9
        rows[name] = {"median_s": med, "p10_s": q[0], "p90_s": q[-1], "images_per_s": images / med, "rounds_s": ts}
    ratio = rows["shoal"]["images_per_s"] / rows["mwms"]["images_per_s"]
    per_round = [m / s for s, m in zip(got["times_s"]["shoal"], got["times_s"]["mwms"])]
    report = {
        "benchmark": "tf_synthetic", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "model": args.model, "image_size": args.image_size, "batch_per_rank": args.batch_size,
        "world_size": args.np, "params": got["params"], "gradient_mb": got["params"] * 4 / 2 ** 20,
        "tf": got["tf"], "keras": got["keras"], "python": platform.python_version(), "cpus": os.cpu_count(),
        "threads_per_rank": args.threads, "load_avg_before": load_before, "load_avg_after": load_after,
        "wall_s": wall, "modes": rows, "ratio_shoal_over_mwms": ratio,
        "ratio_per_round": per_round, "ratio_shoal_over_local": rows["shoal"]["images_per_s"] /
        rows["local"]["images_per_s"],
    }
    path = save_report(report, "tf-synthetic")
    print(f"\n{args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}/rank, {args.np} ranks, "
          f"{got['params'] / 1e6:.1f} M params; load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    for name, row in rows.items():
        print(f"  {name:6s} {row['median_s'] * 1e3:8.0f} ms/step (p10 {row['p10_s'] * 1e3:.0f}, p90 "
              f"{row['p90_s'] * 1e3:.0f})  {row['images_per_s']:7.2f} img/s")
    print(f"  shoal / mwms throughput: {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in per_round)})")
    print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
