"""The job's store as the ranks see it: torch's rendezvous store, every key under the job's secret.

Design constraints:

1. No rendezvous of our own: the store is the one torch's ``dist.rendezvous(init_method)`` returns
   (``env://``, ``file://``, ``tcp://``), set up exactly as ``init_process_group(init_method=...)``
   would (same timeout), and handed to ``init_process_group(store=...)``.
2. A stranger who reaches the store's port must neither read nor forge the job's records. Under
   ``shoal run`` the ranks get 128 random bits in ``SHOAL_JOB_SECRET``; the store given to the
   default group is a ``PrefixStore`` of it, so the process groups' keys and Shoal's own records
   (``shoal/doing/...``, ``shoal/join/...``, read through the default store) all live under it.
   Without a secret (torchrun, mpirun, SLURM, the test harness) the store is torch's, unchanged.
3. MPI needs no store: torch ignores one for the mpi backend, so none is made.

What lives elsewhere: the launcher's side of the same store (:mod:`shoal.runner.agent`), reading
the secret (:func:`shoal.core.env.job_secret`).
"""

from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist

from . import env as _env

__all__ = ["init_default_group"]


def init_default_group(backend: str, init_method: str, rank: int, world_size: int,
                       timeout: datetime.timedelta) -> None:
    """``dist.init_process_group`` on the job's store (constraints 1-3).

    Args:
        backend: gloo, nccl or mpi.
        init_method: torch's rendezvous URL (``env://``, ``file://PATH``, ``tcp://HOST:PORT``).
        rank, world_size: this rank and the world's size.
        timeout: the process groups' timeout; the store's too.

    Raises:
        RuntimeError, ValueError: as ``init_process_group`` does (rendezvous timeout, bad URL).

    Example:
        >>> init_default_group("gloo", "env://", 0, 2, datetime.timedelta(seconds=300))
    """
    secret: Optional[str] = _env.job_secret()
    if backend == "mpi" or not secret:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(secret, store), rank=rank,
                            world_size=world_size, timeout=timeout)
