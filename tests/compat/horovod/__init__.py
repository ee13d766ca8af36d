"""An import shim, for running Horovod's own test files and examples against Shoal: ``import horovod.tensorflow``
gives ``shoal.tensorflow``. Test infrastructure only (it lives outside ``src/`` and is never installed); see
tests/compat/run_horovod_tf.py."""

__all__: list[str] = []
