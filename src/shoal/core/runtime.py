"""The runtime: ``init`` / ``shutdown``, who-am-I queries, topology process groups and process sets.

Design constraints:

1. Importing does nothing. ``init()`` reads the environment once (through :mod:`shoal.core.env`),
   joins or adopts the torch.distributed default group, gathers every rank's host name once, and builds
   the world / local / cross groups once, and registers an exit handler that tears them down.
   Nothing runs in the background afterwards.
2. No home-made transport or rendezvous: the store and the groups are torch.distributed's.
3. A failed collective must say which rank is at fault. Every rank's host and pid are gathered at
   init, so that :func:`explain_failure` can tell a dead local peer from a slow one.
4. ``init`` twice is a no-op (Horovod allows it); ``shutdown`` then ``init`` starts over.

What lives elsewhere: collectives (:mod:`shoal.core.collectives`), gradient reduction (the engine),
network variable choices and the backend rule (:mod:`shoal.core.network`).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from . import env as _env
from . import exchange as _exchange
from . import jobstore as _jobstore
from . import network as _network
from .config import ShoalConfig
from .errors import NotInitializedError, RankFailureError, format_ranks
from .topology import Layout, compute_layout

__all__ = [
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
    "config",
    "layout",
    "device",
    "ProcessSet",
    "global_process_set",
    "add_process_set",
    "remove_process_set",
    "get_process_set",
    "local_group",
    "cross_group",
    "new_group",
    "stream_groups",
    "stream_node_groups",
    "launch_in_order",
    "explain_failure",
    "peer_closed",
    "world_token",
    "control_group",
    "generation",
    "elastic",
    "mark_broken",
    "abandon_futures",
    "leave_world",
    "enter_world",
    "LeftWorld",
]

log = logging.getLogger(__name__)


class ProcessSet:
    """A subset of ranks that collectives can run on (Horovod's ``hvd.ProcessSet``).

    Create one with :func:`add_process_set` on every rank (torch requires every rank of the world to
    take part in creating a group, members or not). ``global_process_set`` holds all ranks.

    Example:
        >>> evens = hvd.add_process_set([0, 2])
        >>> if evens.included(): hvd.allreduce(t, process_set=evens)
    """

    __slots__ = ("ranks", "process_set_id", "group")

    def __init__(self, ranks: Iterable[int]):
        self.ranks: tuple[int, ...] = tuple(sorted(set(int(r) for r in ranks)))
        self.process_set_id: Optional[int] = None
        self.group: Optional[dist.ProcessGroup] = None

    def included(self) -> bool:
        """True when the calling rank belongs to this set."""
        return rank() in self.ranks

    def rank(self) -> int:
        """This process's rank inside the set; raises ValueError when it is not a member."""
        me = rank()
        if me not in self.ranks:
            raise ValueError(f"shoal: rank {me} is not in process set {self.ranks}")
        return self.ranks.index(me)

    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"ProcessSet(id={self.process_set_id}, ranks={list(self.ranks)})"


#: All ranks; usable once ``init`` has run.
global_process_set = ProcessSet(())


@dataclass(slots=True)
class _Runtime:
    config: ShoalConfig
    world: _env.WorldInfo
    layout: Layout
    hosts: list[str]
    pids: list[int]
    device: torch.device
    owns_default_group: bool
    generation: int = 0
    local_group: Optional[dist.ProcessGroup] = None
    cross_group: Optional[dist.ProcessGroup] = None
    process_sets: dict[int, ProcessSet] = field(default_factory=dict)
    streams: dict[tuple[int, ...], list[dist.ProcessGroup]] = field(default_factory=dict)
    #: Per stream: (local group, cross group) of this rank, for hierarchical algorithms.
    node_streams: list[tuple[dist.ProcessGroup, dist.ProcessGroup]] = field(default_factory=list)
    next_set_id: int = 1
    #: Per stream group (by id; the groups live as long as this object): the future of the operation
    #: launched last on it through :func:`launch_in_order`.
    stream_tails: dict[int, torch.futures.Future] = field(default_factory=dict)


_rt: Optional[_Runtime] = None
_atexit_registered = False
#: The world this process is in (see :func:`generation`).
_generation = 0
#: A collective of this world failed (see :func:`mark_broken`).
_broken = False


def _state(what: str) -> _Runtime:
    if _rt is None:
        raise NotInitializedError(what)
    return _rt


def _agree_with_mpi(world: _env.WorldInfo) -> _env.WorldInfo:
    """Under mpirun without MASTER_ADDR: rank 0 picks host and port, mpi4py broadcasts them."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise RuntimeError(
            "shoal: launched by mpirun but MASTER_ADDR is not set and mpi4py is not installed. "
            "HINT: `pip install mpi4py`, or pass the rendezvous with "
            "`mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=29500 ...`.") from None
    comm = MPI.COMM_WORLD
    addr_port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            addr_port = (socket.gethostname(), s.getsockname()[1])
    addr, port = comm.bcast(addr_port, root=0)
    return _env.WorldInfo(world.rank, world.size, world.local_rank, world.local_size,
                          f"tcp://{addr}:{port}", addr, port, world.source)


def init(backend: Optional[str] = None, timeout_s: Optional[float] = None, **knobs) -> None:
    """Start Shoal on this process: join the world, learn the topology, build process groups.

    Args:
        backend: ``gloo``, ``nccl`` or ``mpi``; default nccl when a CUDA device is present, else gloo.
        timeout_s: seconds any collective may wait for its peers before failing.
        **knobs: any other :class:`~shoal.core.config.ShoalConfig` field, overriding ``SHOAL_*``.

    Raises:
        ValueError: a knob is invalid (the message names it and its variable).
        RuntimeError: the launcher's environment is incomplete (the message says what to set).

    Example:
        >>> import shoal.torch as hvd
        >>> hvd.init()
        >>> print(hvd.rank(), hvd.size())
    """
    global _generation
    if _rt is not None:
        return
    cfg = _env.read_config(backend=backend, timeout_s=timeout_s, **knobs)
    _env.warn_unknown_variables()  # a misspelled SHOAL_* would be ignored without a word
    world = _env.detect_world()
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    owns = not dist.is_initialized()
    if owns:
        if world.source == "mpi" and world.init_method is None:
            world = _agree_with_mpi(world)
        chosen = _network.expected_backend(cfg)[0]  # the one rule; `shoal doctor` shows its reason
        _network.configure(cfg, world, backend=chosen)  # interface and NCCL variables, before the group
        if chosen == "nccl":
            count = torch.cuda.device_count()
            torch.cuda.set_device((world.local_rank or 0) % max(count, 1))
        if world.init_method == "env://" and (world.master_addr is None or world.master_port is None):
            raise RuntimeError(
                f"shoal: launched by {world.source} (rank {world.rank} of {world.size}) but "
                "MASTER_ADDR/MASTER_PORT are not set. HINT: launch with `shoal run` or torchrun, or "
                "export MASTER_ADDR=<host of rank 0> MASTER_PORT=29500.")
        if world.source == "elastic":
            _enter_elastic(cfg, world, chosen, timeout)  # builds the world too
            return
        elif world.init_method is None:
            # A world of one (plain `python train.py`): an in-memory store, no sockets.
            dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif chosen == "mpi":  # MPI needs no store (jobstore, constraint 4)
            dist.init_process_group(chosen, init_method=world.init_method, rank=world.rank,
                                    world_size=world.size, timeout=timeout)
        else:
            start_s = max(cfg.start_timeout_s, cfg.timeout_s)
            store = _jobstore.job_store(world.init_method, world.rank, world.size, timeout,
                                        datetime.timedelta(seconds=start_s))
            _generation += 1  # a world of its own for every init() of this process (jobstore, constraint 3)
            gen_store = _jobstore.generation_store(store, _generation)
            _jobstore.await_start(gen_store, world.rank, world.size, start_s)
            dist.init_process_group(chosen, store=gen_store, rank=world.rank, world_size=world.size,
                                    timeout=timeout)
    _build_world(cfg, world, owns)


def _enter_elastic(cfg: ShoalConfig, world: _env.WorldInfo, backend: str, timeout: datetime.timedelta) -> None:
    """``init()`` of an elastic worker: rank and size come from the job's membership, agreed in its store
    (:mod:`shoal.core.membership`); each generation's groups live under a prefix of their own. A joiner whose
    generation fails to form (a peer died or gave up while the groups were being built) asks to join the next
    one; a failure of the first generation fails the job's start like any other launch."""
    from . import elastic, membership  # noqa: PLC0415 (elastic only)

    store = _jobstore.open_elastic_store(world.master_addr, world.master_port, timeout)
    left = LeftWorld(cfg, world, backend)
    for attempt in range(1, membership.FORM_ATTEMPTS + 1):
        member = membership.enter(store, cfg)
        try:
            enter_world(left, member.rank, member.size, member.generation)
        except Exception as exc:  # noqa: BLE001 (any failure to build the groups: try the next generation)
            if member.survivors == 0 or attempt == membership.FORM_ATTEMPTS:
                raise
            log.warning("shoal: elastic generation %d did not form on this joiner (%s: %s); it asks to join the "
                        "next one", member.generation, type(exc).__name__, str(exc).splitlines()[0][:200])
            continue
        elastic.entered(store, member)
        return


def _build_world(cfg: ShoalConfig, world: _env.WorldInfo, owns: bool) -> None:
    """What every new world needs once the default group exists: every rank's host and pid, the layout,
    the node groups, the global process set, the exit handler."""
    global _rt, _atexit_registered, _broken
    _broken = False
    me, n = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    # One allgather at init: host and pid of every rank (pids let failures name a dead local peer), as
    # JSON (shoal.core.exchange): nothing a peer sends is unpickled.
    peers = _exchange.allgather_json([socket.gethostname(), os.getpid()], device=dev)
    if any(not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int))
           for p in peers):
        raise RankFailureError(f"shoal: init() on rank {me}: a peer sent a malformed host record {peers!r}",
                               rank=me, what="init")
    hosts = [p[0] for p in peers]
    lay = compute_layout(hosts, cfg.local_size)
    _rt = _Runtime(config=cfg, world=world, layout=lay, hosts=hosts, pids=[p[1] for p in peers],
                   device=dev, owns_default_group=owns, generation=_generation)
    # Every rank creates every group, in the same order (torch requires it).
    for node in lay.nodes:
        g = new_group(node)
        if me in node:
            _rt.local_group = g
    for ranks in lay.cross_groups():
        g = new_group(ranks)
        if me in ranks:
            _rt.cross_group = g
    global_process_set.ranks = tuple(range(n))
    global_process_set.process_set_id = 0
    global_process_set.group = dist.group.WORLD
    _rt.process_sets[0] = global_process_set
    # Gloo finishes connecting a group's pairs asynchronously; without this barrier a fast rank can
    # leave (or exit) while a peer is still connecting to it, and the peer sees "closed by peer".
    dist.barrier()
    if not _atexit_registered:
        # A script that ends without shutdown() leaves gloo's pairs to the interpreter's teardown, which
        # aborts the process now and then ("terminate called without an active exception", SIGABRT, seen
        # in 3 of 6 two-host runs here); destroying the groups first makes every such exit clean.
        atexit.register(_shutdown_at_exit)
        _atexit_registered = True
    log.debug("shoal: rank %d/%d up (generation %d), layout %s, backend %s", me, n, _generation, lay.nodes,
              dist.get_backend())


def generation() -> int:
    """The number of the world this process is in: one per ``init()`` of the process (after a
    ``shutdown()``), or the elastic membership's generation; 0 before the first ``init()``."""
    return _generation


def elastic() -> bool:
    """True in an elastic worker (``shoal run --min-np/--max-np``): the world may change while it runs."""
    return _rt is not None and _rt.world.source == "elastic"


def mark_broken() -> None:
    """A collective of this world failed (a peer died, hung or left): operations may still be pending on
    its groups, so tearing them down aborts them instead of waiting for them (:func:`shutdown`)."""
    global _broken
    _broken = True


#: Process groups of broken worlds, forgotten but never destroyed (see :func:`_teardown`).
_abandoned: list[Any] = []
#: Operations of broken worlds still pending when this rank left them (see :func:`abandon_futures`).
_abandoned_futures: list[Any] = []
#: How long the exit waits for them (a peer's exit ends them; the ranks of a job end together).
_EXIT_WAIT_S = 10.0


def abandon_futures(futures: Sequence[Any]) -> None:
    """Keep the pending operations of a world this rank gives up on, and let the process's exit wait for
    them (bounded by ``_EXIT_WAIT_S``).

    Such an operation ends when a peer's connection closes: its future then fails on gloo's thread, which
    runs the future's Python callbacks. Measured here (torch 2.13, gloo, 3 ranks, a pending allreduce with
    a Python ``then`` callback left behind by one rank): when that close arrives while the process is
    finalizing the interpreter, the process aborts ("terminate called after throwing an instance of
    'gloo::IoException'", SIGABRT) in 2 of 2 runs; when it arrives while the interpreter is alive (an exit
    handler waiting for it) it ends cleanly, 4 of 4. The futures are also kept referenced here, so that none
    is collected while its operation is pending."""
    global _exit_wait_registered
    pending = [f for f in futures if f is not None and not f.done()]
    if not pending:
        return
    _abandoned_futures.extend(pending)
    if not _exit_wait_registered:
        atexit.register(_wait_abandoned_at_exit)
        _exit_wait_registered = True


_exit_wait_registered = False


def _wait_abandoned_at_exit() -> None:
    deadline = time.monotonic() + _EXIT_WAIT_S
    while any(not f.done() for f in _abandoned_futures) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sum(1 for f in _abandoned_futures if not f.done())
    if left:
        log.debug("shoal: %d operation(s) of an abandoned world still pending at exit", left)


def _teardown(abandon: bool) -> None:
    """Let go of every process group of this world.

    A healthy world is destroyed. A broken one (a peer died, hung or left) is abandoned instead: torch
    forgets its groups (so that the next world can be built) without shutting them down, and they are kept
    alive, never destroyed, until the process ends. Measured here with gloo, with an operation of the
    broken world still pending on a peer that stays alive: ``destroy`` waited for it (23 s, until that
    peer's process ended); ``abort`` then ``destroy`` returned at once, but the gloo thread still blocked in
    the operation later met the closed connection and terminated the process ("terminate called after
    throwing an instance of 'gloo::IoException'", SIGABRT at exit). Abandoned, the operation ends the usual
    way (it fails when its peers' connections close, handled on gloo's thread) and nothing waits for it.
    """
    if not dist.is_initialized():
        return
    if not abandon:
        dist.destroy_process_group()
        return
    c10d = dist.distributed_c10d
    world = c10d._world
    groups = list(world.pg_map)
    for pg in groups:
        # The deliberate leak: a group's destructor waits for its pending operations, also at interpreter
        # exit, so these never get one (a few threads and sockets per failure, for the life of the process).
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))
    _abandoned.extend(groups)
    c10d._update_default_pg(None)
    for table in (world.pg_map, world.pg_names, world.pg_group_ranks, world.pg_backend_config, world.pg_to_tag,
                  world.tags_to_pg, world.pg_coalesce_state):
        table.clear()
    c10d._unregister_all_process_groups()
    world.group_count = 0


def _forget_world() -> None:
    global _rt
    rt, _rt = _rt, None
    for ps in ([] if rt is None else list(rt.process_sets.values())):
        if ps is not global_process_set:  # their groups are gone with the world: registered again or not at all
            ps.process_set_id = None
            ps.group = None
    global_process_set.ranks = ()
    global_process_set.process_set_id = None
    global_process_set.group = None


def shutdown() -> None:
    """Tear down what ``init`` built. Safe to call twice or before ``init``. A later ``init()`` starts a new
    world (its own store prefix, jobstore constraint 3)."""
    if _rt is None:
        return
    owns = _rt.owns_default_group
    if owns:
        _teardown(abandon=_broken)
    _forget_world()


@dataclass(frozen=True, slots=True)
class LeftWorld:
    """What :func:`leave_world` keeps for :func:`enter_world`: the config, the launcher's view, the backend."""

    config: ShoalConfig
    world: _env.WorldInfo
    backend: str


def leave_world() -> LeftWorld:
    """Leave this world (elastic training): abandon its groups at once, whatever is pending on them
    (:func:`_teardown`), and forget it. :func:`enter_world` then joins the next generation's.

    Raises:
        NotInitializedError: before ``init()``.
    """
    rt = _state("leave_world")
    left = LeftWorld(rt.config, rt.world, str(dist.get_backend()))
    _teardown(abandon=True)
    from . import join  # noqa: PLC0415 (it imports this module)

    join.forget_world()  # the step owners let go of the old groups: they close now
    _control.clear()
    _forget_world()
    return left


def enter_world(left: LeftWorld, rank: int, size: int, new_generation: int) -> None:
    """Join generation ``new_generation`` as ``rank`` of ``size``: its groups under the generation's prefix of
    the job's store, then everything ``init`` builds on top (every member calls it at the same point)."""
    global _generation
    timeout = datetime.timedelta(seconds=left.config.timeout_s)
    store = _jobstore.open_elastic_store(left.world.master_addr, left.world.master_port, timeout)
    _generation = new_generation
    try:
        dist.init_process_group(left.backend, store=_jobstore.generation_store(store, new_generation), rank=rank,
                                world_size=size, timeout=timeout)
        _build_world(left.config, dataclasses.replace(left.world, rank=rank, size=size), True)
        control_group(global_process_set)  # now, inside the generation's bounds, not at the first step
    except BaseException:
        # Some member did not come (died, or gave up waiting): whatever was built is abandoned like a
        # broken world, and the caller tries the next generation.
        _teardown(abandon=True)
        from . import join  # noqa: PLC0415 (it imports this module)

        join.forget_world()
        _control.clear()
        _forget_world()
        raise


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 (the process is exiting; say why teardown failed, go on)
        log.warning("shoal: shutdown at exit failed: %s", exc)


def is_initialized() -> bool:
    """True between ``init()`` and ``shutdown()``."""
    return _rt is not None


def rank() -> int:
    """This process's rank in the world."""
    _state("rank")
    return dist.get_rank()


def size() -> int:
    """Number of ranks in the world."""
    _state("size")
    return dist.get_world_size()


def local_rank() -> int:
    """Rank inside this node (see ``local_size`` in the config to emulate nodes)."""
    return _state("local_rank").layout.local_rank(dist.get_rank())


def local_size() -> int:
    """Number of ranks on this node."""
    return _state("local_size").layout.local_size(dist.get_rank())


def cross_rank() -> int:
    """Index of this rank's node (its rank in the cross group)."""
    return _state("cross_rank").layout.cross_rank(dist.get_rank())


def cross_size() -> int:
    """Number of nodes holding this rank's local rank (the number of nodes when homogeneous)."""
    return _state("cross_size").layout.cross_size(dist.get_rank())


def is_homogeneous() -> bool:
    """True when every node runs the same number of ranks."""
    return _state("is_homogeneous").layout.is_homogeneous


def config() -> ShoalConfig:
    """The resolved configuration of this run."""
    return _state("config").config


def layout() -> Layout:
    """The node layout of this run."""
    return _state("layout").layout


def device() -> torch.device:
    """The device collectives run on: the rank's GPU under nccl, else the CPU."""
    return _state("device").device


def local_group() -> Optional[dist.ProcessGroup]:
    """Process group of this rank's node."""
    return _state("local_group").local_group


def cross_group() -> Optional[dist.ProcessGroup]:
    """Process group of the ranks with this rank's local rank, one per node."""
    return _state("cross_group").cross_group


def new_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A new torch.distributed group over ``ranks``; every rank of the world must call it."""
    rt = _state("new_group")
    timeout = datetime.timedelta(seconds=rt.config.timeout_s)
    return dist.new_group(list(ranks), timeout=timeout, use_local_synchronization=False)


def stream_groups(process_set: ProcessSet, count: int) -> list[dist.ProcessGroup]:
    """``count`` process groups over ``process_set``'s ranks, for concurrent buckets ("streams").

    Created on first use and cached, so every reducer on the same ranks shares them. Creating groups is
    collective over the whole world: every rank must ask for the same counts in the same order (reducers
    are built in the same order on every rank, which guarantees it).
    """
    rt = _state("stream_groups")
    have = rt.streams.setdefault(process_set.ranks, [])
    while len(have) < count:
        have.append(new_group(process_set.ranks))
        dist.barrier()  # see init(): gloo connects pairs asynchronously
    return have[:count]


def launch_in_order(group: dist.ProcessGroup, launch: Callable[[], torch.futures.Future]) -> torch.futures.Future:
    """Run ``launch()`` (which starts one reduction on stream ``group`` and returns its future) once the
    operation launched before it on the same stream has completed: one operation in flight per stream,
    in the order of the calls.

    Why: gloo runs two operations of one group at once (2 threads per group; torch 2.13 ignores gloo's
    ``pg_options`` in ``new_group``), and they share the link, so a later small bucket overtook an earlier
    big one, and the big one's share of the optimizer step came last, exposed: measured at 1 Gbit/s on
    mlp_big, the 64 MB bucket landed 36 ms of optimizer step before the end of the step. In order, each
    bucket lands as early as the link allows. The tuner still runs several streams at once.

    The calls come from one thread (the step's), so the order is the same on every rank. A launch that
    waits runs on the backend's completion thread. When the previous operation failed, ``launch`` is not
    called and the returned future fails with the same error (the group is broken). NCCL orders each
    communicator's operations on its own CUDA stream already: there ``launch()`` runs at once.

    Returns:
        A future that completes with ``launch()``'s future (its value or its error).
    """
    rt = _state("launch_in_order")
    prev = rt.stream_tails.get(id(group))
    if rt.device.type != "cpu" or prev is None or prev.done():
        fut = launch()
        rt.stream_tails[id(group)] = fut
        return fut
    out: torch.futures.Future = torch.futures.Future()

    def forward(done: torch.futures.Future) -> None:
        try:
            out.set_result(done.value())
        except BaseException as exc:  # noqa: BLE001 (the waiter raises it)
            out.set_exception(exc)

    def go(before: torch.futures.Future) -> None:
        try:
            before.value()  # raises the predecessor's error: do not launch on a broken group
            launch().add_done_callback(forward)
        except BaseException as exc:  # noqa: BLE001 (the waiter raises it; nothing may escape a callback)
            out.set_exception(exc)

    prev.add_done_callback(go)
    rt.stream_tails[id(group)] = out
    return out


def stream_node_groups(count: int) -> list[tuple[dist.ProcessGroup, dist.ProcessGroup]]:
    """``count`` pairs ``(local group, cross group)`` of this rank, one pair per stream, for
    hierarchical algorithms: each stream reduces inside the node and across nodes on groups of its own,
    so that buckets in flight on different streams do not queue behind each other.

    Created on first use and cached; collective over the whole world, like :func:`stream_groups`.
    """
    rt = _state("stream_node_groups")
    me = dist.get_rank()
    while len(rt.node_streams) < count:
        local = cross = None
        for node in rt.layout.nodes:
            g = new_group(node)
            local = g if me in node else local
        for ranks in rt.layout.cross_groups():
            g = new_group(ranks)
            cross = g if me in ranks else cross
        rt.node_streams.append((local, cross))
        dist.barrier()  # see init(): gloo connects pairs asynchronously
    return rt.node_streams[:count]


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a process set; call it on every rank, in the same order.

    Returns:
        The registered :class:`ProcessSet` (its ``process_set_id`` is set).
    Raises:
        ValueError: a rank is out of range, or the same ranks are registered already.
    """
    rt = _state("add_process_set")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    n = dist.get_world_size()
    bad = [r for r in ps.ranks if not 0 <= r < n]
    if bad or not ps.ranks:
        raise ValueError(f"shoal: process set {list(ps.ranks)} has ranks outside 0..{n - 1}: {bad}")
    if any(other.ranks == ps.ranks for other in rt.process_sets.values()):
        raise ValueError(f"shoal: a process set with ranks {list(ps.ranks)} is registered already")
    ps.group = new_group(ps.ranks)
    dist.barrier()  # see init(): let every member finish connecting before anyone moves on
    ps.process_set_id = rt.next_set_id
    rt.next_set_id += 1
    rt.process_sets[ps.process_set_id] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set (the global set cannot be removed). Returns True when removed."""
    rt = _state("remove_process_set")
    if process_set.process_set_id in (None, 0):
        return False
    removed = rt.process_sets.pop(process_set.process_set_id, None) is not None
    process_set.process_set_id = None
    process_set.group = None
    return removed


def get_process_set(process_set: Optional[ProcessSet], what: str = "process_set") -> ProcessSet:
    """Resolve ``None`` to the global set and check that ``process_set`` is registered.

    ``what`` is the caller's public name, for the error when ``init()`` has not run."""
    rt = _state(what)
    ps = global_process_set if process_set is None else process_set
    if ps.process_set_id is None or ps.process_set_id not in rt.process_sets:
        raise ValueError(f"shoal: {ps!r} is not registered. HINT: call hvd.add_process_set(...) "
                         "on every rank first.")
    return ps


_PF_EXITING = 0x4  # linux/sched.h: set at the start of do_exit(), before the process closes its files


def _is_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # A killed peer closes its sockets (what the survivor sees) before it turns zombie, so the state
        # alone can still read R or D at that moment: the exiting flag closes that race.
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    except OSError:
        return False


#: A peer that closed its connection is usually exiting (that is what closed it): how long a failure waits
#: for it to be seen dead, so that the error names it rather than quoting "connection closed".
_EXIT_GRACE_S = 2.0


def peer_closed(exc: BaseException) -> bool:
    """A backend error that says a peer's connection went away (gloo: 'Connection closed by peer',
    'Connection reset by peer', 'Broken pipe'). The backend says it only in text: this is the one place
    that reads it."""
    text = str(exc).lower()
    return any(w in text for w in ("closed", "reset", "broken pipe", "connection", "eof"))


def _backend_timed_out(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


def _dead_local_peers(rt: "_Runtime", peers: Sequence[int], me: int) -> list[int]:
    host = socket.gethostname()
    return [r for r in peers if r != me and rt.hosts[r] == host and _is_dead(rt.pids[r])]


def _gone_elsewhere() -> bool:
    """Elastic: the launcher reported a worker gone (maybe on another host): no need to wait to see one here."""
    if not elastic():
        return False
    from . import elastic as _elastic  # noqa: PLC0415 (elastic imports this module)

    return _elastic.peer_reported_gone()


def explain_failure(exc: BaseException, what: str, ranks: Optional[Sequence[int]] = None, *,
                    grace_s: Optional[float] = None) -> RankFailureError:
    """Turn a backend error of a collective into a :class:`RankFailureError` naming the cause.

    Peers on this host are checked for liveness through their pids; a dead one is named as the root cause
    (``dead_ranks``). When the backend says a connection closed, the peer is usually on its way out: it is
    given up to ``grace_s`` (default 2 s) to be seen gone. Peers on other hosts cannot be checked from here
    and are listed as unknown. A backend timeout sets ``timed_out``; the stall inspector then names the
    ranks that never arrived (:func:`shoal.core.stall.name_missing`).
    """
    if isinstance(exc, RankFailureError):
        return exc
    mark_broken()
    rt = _rt
    me = dist.get_rank() if dist.is_initialized() else -1
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if rt is None:
        return RankFailureError(f"shoal: {what} failed on rank {me}: {text}", rank=me, what=what)
    peers = list(ranks) if ranks is not None else list(range(len(rt.hosts)))
    dead = _dead_local_peers(rt, peers, me)
    if not dead and peer_closed(exc):
        deadline = time.monotonic() + (_EXIT_GRACE_S if grace_s is None else grace_s)
        while not dead and time.monotonic() < deadline and not _gone_elsewhere():
            time.sleep(0.05)
            dead = _dead_local_peers(rt, peers, me)
    remote = [r for r in peers if r != me and rt.hosts[r] != socket.gethostname()]
    if dead:
        return RankFailureError(rank=me, what=what, dead_ranks=dead, dead_pids={r: rt.pids[r] for r in dead},
                                backend_text=text)
    if _backend_timed_out(exc):
        return RankFailureError(rank=me, what=what, timed_out=True, timeout_s=rt.config.timeout_s,
                                backend_text=text)
    return RankFailureError(rank=me, what=what, backend_text=text, unknown_ranks=remote)


def world_token() -> Any:
    """The current default group: caches of groups and step owners are valid only while it is the same
    (a ``shutdown()`` and ``init()`` start a new world)."""
    return dist.distributed_c10d._get_default_group()


_control: dict[tuple[int, ...], tuple[Any, dist.ProcessGroup]] = {}


def control_group(process_set: ProcessSet) -> dist.ProcessGroup:
    """The gloo group of ``process_set``'s ranks that carries control traffic (registration digests, the
    negotiation's bit vectors: bitwise ops exist on gloo, not on NCCL, and the bits are host state anyway).
    Created once per world, by the set's members only."""
    rt = _state("control_group")
    token = world_token()
    have = _control.get(process_set.ranks)
    if have is not None and have[0] is token:
        return have[1]
    timeout = datetime.timedelta(seconds=rt.config.timeout_s)
    # Members only (use_local_synchronization): a process set's non-members never build an optimizer on it.
    try:
        group = dist.new_group(list(process_set.ranks), timeout=timeout, backend="gloo",
                               use_local_synchronization=True)
    except RuntimeError as exc:  # a member died or never came: named like any failed collective
        raise explain_failure(exc, f"creating the control group of ranks {format_ranks(process_set.ranks)}",
                              process_set.ranks) from exc
    _control[process_set.ranks] = (token, group)
    return group
