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
5. Starting is not a collective. Ranks reach ``init()`` seconds apart (imports, data, a loaded machine), so
   every rank first waits for all to arrive under ``start_timeout_s`` (:func:`await_start`), and only
   then builds the groups, whose store waits are bounded by ``timeout_s``. A short ``timeout_s`` (stall
   detection in seconds) would otherwise fail the start of a job whose ranks merely started 3 s apart
   (seen: gloo's connect timed out waiting for rank 0's address). A rank that never comes is named.

What lives elsewhere: the launcher's side of the same store (:mod:`shoal.runner.agent`), reading the secret
(:func:`shoal.core.env.job_secret`), the elastic membership kept in it (:mod:`shoal.core.membership`).
"""

from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist

from . import env as _env

__all__ = ["job_store", "generation_store", "await_start", "open_elastic_store", "forget"]

#: (the rendezvous it came from, the store): opened once per process (constraint 3).
_cached: Optional[tuple[tuple, dist.Store]] = None


def job_store(init_method: str, rank: int, world_size: int, timeout: datetime.timedelta,
              start_timeout: Optional[datetime.timedelta] = None) -> dist.Store:
    """The job's store for this process (constraints 1-3): opened at the first call, the same object after.

    Args:
        init_method: torch's rendezvous URL (``env://``, ``file://PATH``, ``tcp://HOST:PORT``).
        rank, world_size: this rank and the world's size (a TCP rendezvous makes rank 0 the server).
        timeout: the store's timeout (the process groups').
        start_timeout: how long the rendezvous itself may wait for its peers (constraint 5); default timeout.

    Raises:
        RuntimeError, ValueError: as ``dist.rendezvous`` does (rendezvous timeout, bad URL).

    Example:
        >>> store = job_store("env://", 0, 2, datetime.timedelta(seconds=300))
    """
    global _cached
    key = (init_method,)
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=max(timeout, start_timeout or timeout)))
    store.set_timeout(timeout)
    secret: Optional[str] = _env.job_secret()
    store = dist.PrefixStore(secret, store) if secret else store
    _cached = (key, store)
    return store


def await_start(store: dist.Store, rank: int, world_size: int, start_timeout_s: float) -> None:
    """Wait until every rank of this generation has reached ``init()`` (constraint 5).

    Args:
        store: the generation's store (:func:`generation_store`).
        rank, world_size: this rank and the world's size.
        start_timeout_s: how long to wait for the last rank.

    Raises:
        TimeoutError: some rank did not arrive in time; the message names up to 16 of them.

    Example:
        >>> await_start(generation_store(store, 1), rank=0, world_size=2, start_timeout_s=300.0)
    """
    store.set(f"start/{rank}", b"1")
    if store.add("start/count", 1) == world_size:
        store.set("start/all", b"1")
        return
    try:
        store.wait(["start/all"], datetime.timedelta(seconds=start_timeout_s))
    except RuntimeError as exc:  # torch's store timeout (DistStoreError)
        missing = [r for r in range(world_size) if not store.check([f"start/{r}"])]
        if not missing:  # all came between the timeout and the check
            return
        named = ", ".join(map(str, missing[:16])) + (f" and {len(missing) - 16} more" if len(missing) > 16 else "")
        raise TimeoutError(
            f"shoal: rank {rank}: rank(s) {named} of {world_size} did not reach init() within "
            f"start_timeout_s={start_timeout_s:g} s. HINT: see those ranks' output (crashed or stuck before "
            f"init()?); raise SHOAL_START_TIMEOUT_S if they start slowly.") from exc


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
