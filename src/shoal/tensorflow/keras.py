"""``shoal.tensorflow.keras`` is ``shoal.keras``: Horovod's ``horovod.tensorflow.keras`` path, so that
``import shoal.tensorflow.keras as hvd`` runs a ``model.fit`` script written for Horovod.

The module replaces itself with :mod:`shoal.keras` in ``sys.modules``, so the two names are one module (the
same callbacks, the same optimizer wrapper, no second copy of any state); ``__all__`` below is the one of
``shoal.keras`` (tests/unit/test_tensorflow_surface.py checks that they agree).
"""

from __future__ import annotations

import sys

import shoal.keras as _keras

__all__ = [
    "DistributedOptimizer", "is_distributed", "exchange_stats", "callbacks", "elastic", "Compression", "join",
    "allreduce", "allgather", "broadcast", "broadcast_variables", "broadcast_object", "allgather_object",
    "barrier", "ReduceOp", "Average", "Sum", "Min", "Max", "Product",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set", "ShoalError", "MismatchError", "NotInitializedError", "RankFailureError", "StallError",
    "HorovodInternalError", "HostsUpdatedInterrupt",
]

# The import system returns what sys.modules holds for this name once the module has run, so
# `import shoal.tensorflow.keras as hvd` binds shoal.keras itself.
sys.modules[__name__] = _keras
