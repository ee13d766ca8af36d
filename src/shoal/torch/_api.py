"""The few functions of ``shoal.torch`` that adapt Horovod's signatures to the engine's: ``init`` (Horovod's
``comm=`` and ``process_sets=``), ``join`` (its ``device=``), ``start_timeline`` (``file_path``,
``mark_cycles``), and the build and runtime queries (``nccl_built()``, ``gloo_enabled()``, ...), which answer
from torch itself (``torch.distributed.is_*_available``, ``torch.version``) because Shoal has no build of its
own. The package ``shoal.torch`` re-exports them; everything else it exports comes from the engine and the
frontend's modules.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

from shoal.core import env as _env
from shoal.core import join as _join
from shoal.core import runtime as _runtime
from shoal.core import timeline as _timeline
from shoal.core.errors import NotInitializedError
from shoal.core.runtime import ProcessSet, add_process_set

__all__ = ["init", "join", "start_timeline", "nccl_built", "gloo_built", "mpi_built", "cuda_built",
           "rocm_built", "ddl_built", "ccl_built", "mpi_enabled", "gloo_enabled", "mpi_threads_supported"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# init with Horovod's arguments
# --------------------------------------------------------------------------------------------------------

def _world_now() -> tuple[int, int]:
    """(rank, size) of the world ``init`` will join, without joining it."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env.detect_world(quiet=True)  # init() itself logs what detect_world has to say
    return world.rank, world.size


def _is_mpi_comm(comm: Any) -> bool:
    """An mpi4py communicator (duck-typed, so that checking never imports mpi4py)."""
    return callable(getattr(comm, "Get_size", None)) and callable(getattr(comm, "Get_rank", None))


def _check_comm(comm: Any) -> None:
    """Accept what Shoal can honour of Horovod's ``comm=``: nothing, or the whole world."""
    if comm is None:
        return
    rank, size = _world_now()
    if _is_mpi_comm(comm):
        got = (int(comm.Get_rank()), int(comm.Get_size()))
        if got != (rank, size):
            raise ValueError(
                f"shoal: init(comm=...) got an MPI communicator of size {got[1]} (this process is its rank "
                f"{got[0]}), but the launcher started a world of {size} with this process as rank {rank}. "
                "Shoal runs on the whole world only. HINT: pass comm=None (or MPI.COMM_WORLD) and use "
                "process sets for subsets: hvd.init(process_sets=[hvd.ProcessSet(ranks)]).")
        return
    if isinstance(comm, (str, bytes)):
        raise TypeError(f"shoal: init(comm={comm!r}): comm is Horovod's list of ranks or MPI communicator. "
                        "HINT: pass the backend by keyword: hvd.init(backend='gloo').")
    try:
        ranks = [int(r) for r in comm]
    except (TypeError, ValueError):
        raise TypeError(f"shoal: init(comm=...) expects a list of ranks or an mpi4py communicator, got "
                        f"{type(comm).__name__}. HINT: hvd.init() uses the whole world.") from None
    if ranks and ranks != list(range(size)):
        raise ValueError(
            f"shoal: init(comm={ranks}) asks for a communicator over some ranks (or in another order), but "
            f"Shoal runs on the whole world of {size} ranks (this is rank {rank}). HINT: call hvd.init() "
            "on every rank and give the subset as a process set: "
            f"hvd.init(process_sets=[hvd.ProcessSet({ranks})]), then process_set= on each collective; "
            "or start only those ranks.")


def init(comm: Optional[Union[Sequence[int], Any]] = None,
         process_sets: Optional[Union[Sequence[Union[ProcessSet, Sequence[int]]], str]] = None, *,
         backend: Optional[str] = None, timeout_s: Optional[float] = None,
         **knobs: Any) -> list[ProcessSet]:
    """Start Shoal on this process (Horovod's ``hvd.init``): join the world, build the process groups.

    Args:
        comm: Horovod's communicator argument. ``None``, an empty list, the list of every rank in
            order, or an mpi4py communicator over the whole world (``MPI.COMM_WORLD``) are accepted;
            Shoal always runs on the world its launcher started, so anything narrower is an error.
        process_sets: process sets to register right after init, in this order, on every rank:
            :class:`ProcessSet` objects (Horovod's form) or lists of ranks; ``"dynamic"`` (Horovod's
            opt-in for :func:`add_process_set` later) is accepted and changes nothing, since Shoal
            always allows it.
        backend, timeout_s, **knobs: as :func:`shoal.core.runtime.init` (keyword only).

    Returns:
        The registered sets of ``process_sets``, in order (Horovod returns None; the list lets
        rank lists be used: ``evens, odds = hvd.init(process_sets=[[0, 2], [1, 3]])``).

    Raises:
        ValueError: ``comm`` covers less than the world; a process set is invalid or a duplicate
            (the message names the entry).
        TypeError: ``comm`` is neither a list of ranks nor a communicator.

    Example:
        >>> import shoal.torch as hvd
        >>> hvd.init(process_sets=[hvd.ProcessSet([0, 1]), [2, 3]])
        >>> evens = hvd.ProcessSet([0, 2]); hvd.init(process_sets=[evens])   # second init: no-op
    """
    _check_comm(comm)
    if isinstance(process_sets, str):
        if process_sets.lower() != "dynamic":
            raise ValueError(f"shoal: init(process_sets={process_sets!r}): the only string Horovod accepts "
                             "is 'dynamic'. HINT: pass a list of hvd.ProcessSet or of rank lists.")
        process_sets = None
    _runtime.init(backend=backend, timeout_s=timeout_s, **knobs)
    registered: list[ProcessSet] = []
    for i, entry in enumerate(process_sets or ()):
        if isinstance(entry, ProcessSet) and entry.process_set_id is not None:
            registered.append(entry)  # by an earlier init() (a second init is a no-op, as in Horovod)
            continue
        try:
            registered.append(add_process_set(entry))
        except ValueError as exc:
            ranks = list(entry.ranks) if isinstance(entry, ProcessSet) else list(entry)
            raise ValueError(f"shoal: init(process_sets=...) entry {i} {ranks}: {exc}. HINT: give each set "
                             "once, with ranks in 0..size()-1, the same list on every rank.") from None
    return registered


# --------------------------------------------------------------------------------------------------------
# Timeline with Horovod's signature
# --------------------------------------------------------------------------------------------------------

def start_timeline(file_path: Optional[str] = None, mark_cycles: bool = False, *,
                   rank: Optional[int] = None) -> "_timeline.Timeline":
    """Start this rank's timeline (Horovod's ``hvd.start_timeline(file_path, mark_cycles=False)``).

    Args:
        file_path: where to write; rank r writes ``<stem>.rank<r><suffix>`` (see
            :func:`shoal.core.timeline.start_timeline`; default: the ``timeline_filename`` knob).
        mark_cycles: accepted for Horovod scripts. Horovod marks each cycle of its background
            thread; Shoal has no background cycle, and marks every step boundary anyway (the
            ``steps`` track), which is what cycle marks were used to find.
        rank: the rank in the file name (default: this process's rank).

    Example:
        >>> hvd.start_timeline("/tmp/trace.json", mark_cycles=True)
    """
    if mark_cycles:
        log.debug("shoal: mark_cycles=True: step boundaries are always marked on the timeline")
    return _timeline.start_timeline(file_path, rank=rank)


# --------------------------------------------------------------------------------------------------------
# Build and runtime queries (Horovod's basics), answered from torch
# --------------------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    return dist if dist.is_available() else None


def nccl_built() -> int:
    """NCCL's version code when this torch has NCCL, else 0 (Horovod returns NCCL_VERSION_CODE).

    The code is nccl.h's ``NCCL_VERSION(X, Y, Z)``: ``X*10000 + Y*100 + Z`` since NCCL 2.9, e.g.
    21805 for 2.18.5 (``X*1000 + Y*100 + Z`` before); 1 when this torch has NCCL but cannot say which.
    """
    import torch  # noqa: PLC0415

    dist = _dist()
    if dist is None or not dist.is_nccl_available():
        return 0
    try:
        major, minor, patch = (int(v) for v in tuple(torch.cuda.nccl.version())[:3])
    except Exception:  # noqa: BLE001 (NCCL present, version unknown: still "built with NCCL")
        return 1
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def gloo_built() -> bool:
    """True when this torch has the gloo backend (``torch.distributed.is_gloo_available()``)."""
    dist = _dist()
    return bool(dist is not None and dist.is_gloo_available())


def mpi_built() -> bool:
    """True when this torch has the MPI backend (``torch.distributed.is_mpi_available()``)."""
    dist = _dist()
    return bool(dist is not None and dist.is_mpi_available())


def cuda_built() -> bool:
    """True when this torch is a CUDA build (``torch.version.cuda``), whatever the machine has."""
    import torch  # noqa: PLC0415

    return torch.version.cuda is not None


def rocm_built() -> bool:
    """True when this torch is a ROCm build (``torch.version.hip``)."""
    import torch  # noqa: PLC0415

    return getattr(torch.version, "hip", None) is not None


def ddl_built() -> bool:
    """Always False: IBM DDL was a Horovod build option; torch.distributed has no DDL backend."""
    return False


def ccl_built() -> bool:
    """Always False: Shoal runs on gloo, NCCL or MPI, never on a oneCCL backend."""
    return False


def _backend() -> Optional[str]:
    dist = _dist()
    if not _runtime.is_initialized() or dist is None or not dist.is_initialized():
        return None
    return str(dist.get_backend()).lower()


def mpi_enabled() -> bool:
    """True when Shoal runs on torch's MPI backend now (False before ``init``, as in Horovod)."""
    return _backend() == "mpi"


def gloo_enabled() -> bool:
    """True when Shoal runs on the gloo backend now (False before ``init``)."""
    return _backend() == "gloo"


def mpi_threads_supported() -> bool:
    """Whether MPI runs with ``MPI_THREAD_MULTIPLE``, so that mpi4py calls may mix with Shoal's.

    Meaningful only on the MPI backend, as in Horovod. torch's MPI backend initialises MPI asking
    for ``MPI_THREAD_SERIALIZED`` (ProcessGroupMPI::initMPIOnce); the level MPI really granted is
    read through mpi4py (``MPI.Query_thread()``); without mpi4py the answer is False.

    Raises:
        NotInitializedError: before ``init``.
        ValueError: the backend is not MPI (Shoal's collectives then never touch MPI, so mpi4py
            calls cannot interfere with them).
    """
    if not _runtime.is_initialized():
        raise NotInitializedError("mpi_threads_supported")
    backend = _backend()
    if backend != "mpi":
        raise ValueError(
            f"shoal: mpi_threads_supported() is about the MPI backend, but this run uses {backend}. HINT: "
            "Shoal's collectives do not use MPI here, so mpi4py calls cannot clash with them; for the MPI "
            "backend use a torch built with MPI and hvd.init(backend='mpi').")
    try:
        from mpi4py import MPI  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return False
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


# --------------------------------------------------------------------------------------------------------
# join with Horovod's signature
# --------------------------------------------------------------------------------------------------------

def join(device: int = -1, process_set: Optional[ProcessSet] = None) -> int:
    """Say that this rank has finished its data; return the rank that joined last.

    Until every rank has called ``join()``, this rank takes part in the other ranks' optimizer steps with
    zero gradients (every ``DistributedOptimizer`` it stepped is synchronized once per round, its own
    ``step()`` is not called), so ranks with more batches finish them instead of hanging. ``Average`` divides
    by the full number of ranks, joined ones included, as in Horovod. A joined rank's parameters stay where
    its last step left them: broadcast from the returned rank afterwards if every rank needs the final model.

    Only the optimizers' gradient reductions are shadowed. A user collective (``hvd.allreduce`` of a metric,
    say) that the other ranks call while this rank is joined finds no partner: this rank raises
    ``StallError`` after ``stall_timeout_s`` (default 90% of ``timeout_s``), the others
    ``RankFailureError`` after ``timeout_s``, each naming the other and where it is (here: ``step k of
    DistributedOptimizer (inside join())``; there: ``allreduce of 'name' (call n on process set [...])``,
    seen when their timeout comes within this rank's last 1.5 s of looking). Keep such collectives out of
    loops whose length differs across ranks.

    Args:
        device: accepted for Horovod compatibility (where Horovod allocates its zero tensors); the zeros
            here are the optimizer's own gradient buffers.
        process_set: the ranks to join over (default: all).

    Returns:
        The rank of the last process that called ``join()``.

    Raises:
        ShoalError: a ``DistributedOptimizer`` was built with ``negotiation="off"``.
        MismatchError / RankFailureError / StallError: as in ``optimizer.step()``; StallError also when the
            other ranks are in a user collective (see above).

    Example:
        >>> for x, y in loader:           # not the same number of batches on every rank
        ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> last = hvd.join()
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    """
    del device  # the zeros are the optimizers' own (zeroed) buffers
    return _join.join(process_set)
