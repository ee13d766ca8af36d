"""The one helper of ``horovod.tensorflow.util`` that Horovod's tests import."""

import tensorflow as tf

__all__ = ["_executing_eagerly"]


def _executing_eagerly() -> bool:
    """Horovod's name for ``tf.executing_eagerly()``."""
    return tf.executing_eagerly()
