"""Shoal: a pure-Python accelerator for data-parallel training on torch.distributed.

Importing ``shoal`` does nothing (no threads, no environment writes, not even ``import torch``);
``shoal.init()`` does. Frontends: ``shoal.torch`` (Horovod-compatible), ``shoal.keras``.

``shoal.run(func, np=2)`` calls a function on ranks of this machine (Horovod's ``horovod.run``).

Example:
    >>> import shoal.torch as hvd
    >>> hvd.init()
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "is_homogeneous",
    "ShoalConfig",
    "run",
]

_LAZY = {
    "ShoalConfig": "shoal.core.config",
    "run": "shoal.runner.function",
    **{name: "shoal.core.runtime" for name in __all__[1:-2]},
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
