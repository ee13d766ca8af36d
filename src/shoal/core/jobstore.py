"""The job's store as the ranks see it: torch's rendezvous store, every key under the job's secret, and one
prefix per generation of process groups.

Design constraints:

1. No rendezvous of our own: the store is the one torch's ``dist.rendezvous(init_method)`` returns
   (``env://``, ``file://``, ``tcp://``), set up exactly as ``init_process_group(init_method=...)``
   would (same timeout), and handed to ``init_process_group(store=...)``.
2. A stranger who reaches the store's port must neither read nor forge the job's records. Under
   ``shoal run`` the ranks get 128 random bits in ``SHOAL_JOB_SECRET``; the store every group is built
   on is a ``PrefixStore`` of it, so the process groups' keys and Shoal's own records
   (``shoal/doing/...``, ``shoal/join/...``, read through the default store) all live under it.
   Without a secret (torchrun, mpirun, SLURM, the test harness) the store is torch's, unchanged.
3. One store per process, opened once and kept across ``shutdown()`` / ``init()`` and across the
   generations of elastic training: a rendezvous run twice would meet the first one's keys (measured:
   the second ``init()`` of a script connected to the first world's gloo addresses, "Connection
   refused", or hung in ``new_group``). Each world of process groups gets a prefix of its own
   (``shoal/gen<g>``), so no generation ever reads another's keys.
4. MPI needs no store: torch ignores one for the mpi backend, so none is made.

What lives elsewhere: the launcher's side of the same store (:mod:`shoal.runner.agent`), reading the secret
(:func:`shoal.core.env.job_secret`), the elastic membership kept in it (:mod:`shoal.core.membership`).
"""

from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist

from . import env as _env

__all__ = ["job_store", "generation_store", "open_elastic_store", "forget"]

#: (the rendezvous it came from, the store): opened once per process (constraint 3).
_cached: Optional[tuple[tuple, dist.Store]] = None


def job_store(init_method: str, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The job's store for this process (constraints 1-3): opened at the first call, the same object after.

    Args:
        init_method: torch's rendezvous URL (``env://``, ``file://PATH``, ``tcp://HOST:PORT``).
        rank, world_size: this rank and the world's size (a TCP rendezvous makes rank 0 the server).
        timeout: the store's timeout (the process groups').

    Raises:
        RuntimeError, ValueError: as ``dist.rendezvous`` does (rendezvous timeout, bad URL).

    Example:
        >>> store = job_store("env://", 0, 2, datetime.timedelta(seconds=300))
    """
    global _cached
    key = (init_method,)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    secret: Optional[str] = _env.job_secret()
    store = dist.PrefixStore(secret, store) if secret else store
    _cached = (key, store)
    return store


def open_elastic_store(addr: str, port: int, timeout: datetime.timedelta) -> dist.Store:
    """The job's store for an elastic worker: a client of the launcher's store (the launcher holds the
    server, so it outlives every worker), under the secret. Cached like :func:`job_store`."""
    global _cached
    key = ("elastic", addr, port)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    store: dist.Store = dist.TCPStore(addr, port, None, False, timeout)
    secret = _env.job_secret()
    store = dist.PrefixStore(secret, store) if secret else store
    _cached = (key, store)
    return store


def generation_store(store: dist.Store, generation: int) -> dist.Store:
    """The store a generation's process groups are built on (constraint 3)."""
    return dist.PrefixStore(f"shoal/gen{generation}", store)


def forget() -> None:
    """Drop the cached store (tests that start over with another rendezvous)."""
    global _cached
    _cached = None
