"""torch's elastic agent, composed for ``shoal run``: the job's store, torch's static rendezvous on it,
and torch's ``LocalElasticAgent`` telling the sentinel about each worker it starts.

Design constraints:

1. No rendezvous or process manager of our own (DESIGN.md): the pieces are torch's
   (``StaticTCPRendezvous``, ``WorkerSpec``, ``LocalElasticAgent``), put together as
   ``torch.distributed.launcher.api.launch_agent`` does, with two things injected where torch's
   classes take them: the store, and a hook after the workers start.
2. The store listens as narrowly as it can. torch's TCPStore server binds every interface whatever
   host name it is given (measured: ``*:PORT`` in ``ss -ltn``); it also accepts a listening socket
   (``master_listen_fd``), so Shoal binds one itself: 127.0.0.1 when every rank is on this host, the
   master address otherwise.
3. Every key of the job lives under the job's secret (128 random bits): the agents see the store
   through ``PrefixStore(secret)``, the ranks get the secret in ``SHOAL_JOB_SECRET`` and
   ``shoal.init()`` does the same (:mod:`shoal.core.jobstore`). A stranger who reaches the port can
   count keys and add its own, but can neither read nor forge the job's. torch's static rendezvous
   adds its run id (random too) under that.
4. The sentinel (:mod:`shoal.runner.sentinel`) learns each worker's pid the moment it starts.

Imports torch at import: :mod:`shoal.runner.launch` imports this module only when it starts an agent.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from typing import Any, Callable, Union

import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

from .sentinel import Sentinel

__all__ = ["open_store", "make_agent", "global_ranks", "RememberingLogsSpecs"]


class RememberingLogsSpecs(DefaultLogsSpecs):
    """torch's default log layout, remembering where each local rank's stderr went (a rank
    without an error file is summarized by its stderr's last line)."""

    stderrs: dict[int, str] = {}

    def reify(self, envs):
        dest = super().reify(envs)
        self.stderrs = dict(dest.stderrs)
        return dest


class _JobRendezvous(StaticTCPRendezvous):
    """torch's static TCP rendezvous on the store Shoal opened (constraints 2, 3).

    ``StaticTCPRendezvous.next_rendezvous`` creates its own TCPStore only while ``_store`` is unset
    (torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py), and then keys everything under
    ``PrefixStore(run_id, _store)``; giving it the job's store keeps all of torch's logic.
    """

    def __init__(self, store: dist.Store, master_addr: str, master_port: int, rank: int,
                 world_size: int, run_id: str, timeout_s: float):
        super().__init__(master_addr, master_port, rank, world_size, run_id, int(timeout_s))
        self._store = store


class _WatchedAgent(LocalElasticAgent):
    """torch's local agent; each worker's pid goes to the sentinel as soon as it starts (constraint 4)."""

    def __init__(self, *args: Any, sentinel: Sentinel, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sentinel = sentinel

    def _start_workers(self, worker_group):  # SimpleElasticAgent's extension point
        pids = super()._start_workers(worker_group)
        self._sentinel.watch(pids.values())
        return pids


def _listen(addr: str, port: int, remote_peers: bool) -> socket.socket:
    """A listening socket on ``addr:port`` only (constraint 2); port 0 picks a free one.

    Raises:
        ValueError: ``addr`` does not resolve, resolves to loopback while other hosts must reach it,
            is not an address of this host, or the port is taken.
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ValueError(f"shoal: cannot resolve the rendezvous address {addr!r}: {exc}. HINT: give "
                         "--master-addr as an address of the first host.") from None
    if remote_peers and ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback:
        # Debian-style /etc/hosts maps the host's own name to 127.0.1.1: the other hosts could
        # never connect (torch's store, listening everywhere, used to hide this).
        raise ValueError(f"shoal: the rendezvous address {addr!r} resolves to {sockaddr[0]} (loopback) on "
                         f"host {socket.gethostname()}, which the other hosts cannot reach. HINT: give "
                         "--master-addr as the first host's address on the network, e.g. 10.0.0.1.")
    sock = socket.socket(family, kind, proto)
    try:
        # As TCPStore does for its own sockets: a port in TIME_WAIT from the last run is reusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        why = (f"port {port} is in use. HINT: pick another --master-port" if port and exc.errno == 98 else
               f"{exc.strerror}. HINT: --master-addr must be an address of the first host, where the "
               "store listens")
        raise ValueError(f"shoal: the rendezvous store cannot listen on {addr}:{port} on host "
                         f"{socket.gethostname()}: {why}.") from None
    return sock


def open_store(master_addr: str, master_port: int, is_server: bool, secret: str,
               timeout_s: float, remote_peers: bool = False) -> tuple[dist.Store, int]:
    """The job's store as the agents see it: the server on the first host (bound to ``master_addr``
    only), a client elsewhere; keyed under ``secret`` (constraint 3).

    Args:
        remote_peers: other hosts take part (then a loopback address is refused).

    Returns:
        ``(PrefixStore(secret, store), port)``; ``port`` is the one picked when ``master_port`` is 0.

    Raises:
        ValueError: the server cannot listen there (see :func:`_listen`).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_server:
        sock = _listen(master_addr, master_port, remote_peers)
        port = sock.getsockname()[1]
        fd = sock.detach()  # the TCPStore owns the socket from here (it closes it when destroyed)
        store = dist.TCPStore(master_addr, port, None, True, timeout, wait_for_workers=False,
                              master_listen_fd=fd)
    else:
        port = master_port
        store = dist.TCPStore(master_addr, port, None, False, timeout)
    return dist.PrefixStore(secret, store), port


def make_agent(*, store: dist.Store, master_addr: str, master_port: int, node_rank: int, nnodes: int,
               nproc: int, run_id: str, start_timeout_s: float, argv: Union[list[str], tuple[Callable, tuple]],
               logs: DefaultLogsSpecs, monitor_interval_s: float, shutdown_timeout_s: int,
               log_line_prefix_template: str, sentinel: Sentinel) -> LocalElasticAgent:
    """torch's agent for this host's ranks (constraint 1), as ``launch_agent`` builds it.

    ``argv`` is the workers' command, or ``(function, args)`` for workers that call a function
    (:func:`shoal.run`; torch spawns them and returns what the function returns); torch sets their RANK,
    WORLD_SIZE, MASTER_ADDR/PORT (the job's store), TORCHELASTIC_*. No restarts.
    """
    handler = _JobRendezvous(store, master_addr, master_port, node_rank, nnodes, run_id, start_timeout_s)
    entrypoint, args = (argv[0], tuple(argv[1])) if callable(argv[0]) else (argv[0], tuple(argv[1:]))
    spec = WorkerSpec(role="worker", local_world_size=nproc, entrypoint=entrypoint, args=args,
                      rdzv_handler=handler, max_restarts=0, monitor_interval=monitor_interval_s,
                      master_addr=master_addr, master_port=master_port)
    return _WatchedAgent(spec=spec, logs_specs=logs, start_method="spawn",
                         log_line_prefix_template=log_line_prefix_template,
                         shutdown_timeout=shutdown_timeout_s, sentinel=sentinel)


def global_ranks(agent: LocalElasticAgent) -> list[int]:
    """The global ranks of this agent's workers (after its rendezvous)."""
    return [w.global_rank for w in agent.get_worker_group().workers]
