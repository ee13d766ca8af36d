"""``shoal.run(func, np=...)``: Horovod's ``horovod.run`` on this machine: call a Python function on N
ranks and return what each returned.

Horovod's examples start themselves this way when not launched by ``horovodrun`` (``pytorch_mnist.py
--num-proc 2`` calls ``horovod.run(main, args=(args,), np=2, ...)``).

Design constraints:

1. The same machinery as ``shoal run`` (:mod:`shoal.runner.launch`): the job's store bound to 127.0.0.1
   under a per-job secret, torch's static rendezvous and ``LocalElasticAgent``, a sentinel that stops the
   workers if this process dies. torch's agent calls a function entry point in processes it spawns and
   hands back their return values: nothing of ours moves them.
2. Spawned, not forked: the function and its arguments are pickled into the workers by torch's
   multiprocessing, which runs the caller's main module again as ``__mp_main__`` so that functions defined
   in a script resolve. The function must therefore be defined at module level, and the script's
   top-level code must sit under ``if __name__ == "__main__":`` (both true of Horovod's examples). Return
   values come back pickled from processes this call started, as in Horovod.
3. This machine only. Other hosts need an agent on each: ``shoal run -H``; a ``hosts`` argument that names
   another host is refused with that HINT rather than ignored.
4. The caller's process is left as it was: the variables set for the workers (the job's secret,
   ``OMP_NUM_THREADS=1`` with several ranks, ``env=``) are restored afterwards, and so are the signal
   handlers torch's agent installs. (torch's elastic loggers are quieted, as ``shoal run`` does, unless
   ``verbose``: the failure summary says what they would.)

What lives elsewhere: the store, rendezvous and agent (:mod:`shoal.runner.agent`), the failure summary
(:mod:`shoal.runner.report`).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

from shoal.core import env as _env
from shoal.core.config import env_name

from .report import blame, failure_from_torch

__all__ = ["run"]

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _check_hosts(hosts: Optional[str], np: int) -> None:
    if not hosts:
        return
    me = {socket.gethostname(), socket.getfqdn(), *_LOCAL_HOSTS}
    names = [h.strip().split(":")[0] for h in str(hosts).split(",") if h.strip()]
    other = [h for h in names if h not in me]
    if other:
        raise ValueError(f"shoal: run(hosts={hosts!r}) names other hosts ({', '.join(other)}); shoal.run starts "
                         f"ranks on this machine only. HINT: launch the script with `shoal run -np {np} -H "
                         f"{hosts} python script.py` instead.")


def run(func: Callable, args: Sequence = (), kwargs: Optional[Mapping[str, Any]] = None, np: int = 1,
        hosts: Optional[str] = None, use_gloo: Optional[bool] = None, use_mpi: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None, verbose: Optional[int] = None,
        start_timeout: Optional[float] = None, **_horovod_only: Any) -> list:
    """Call ``func(*args, **kwargs)`` on ``np`` ranks of this machine; return their results in rank order.

    Each rank may call ``hvd.init()`` (``shoal.torch``) and every collective, as under ``shoal run``.

    Args:
        func: a module-level function (constraint 2).
        args, kwargs: its arguments (pickled into every rank).
        np: the number of ranks.
        hosts: Horovod's host list; only this machine is accepted (constraint 3).
        use_gloo, use_mpi: Horovod's controller choice; Shoal runs on torch.distributed (gloo on CPU),
            so ``use_mpi=True`` is refused.
        env: extra variables for the ranks.
        verbose: show torch's agent log lines.
        start_timeout: seconds the ranks have to start and meet, at the rendezvous and in ``init()``
            (default: the ``start_timeout_s`` knob, as under ``shoal run``: ``SHOAL_START_TIMEOUT_S`` in
            this environment or ``env``, else 300).
        **_horovod_only: Horovod's other options (ssh ports, network interfaces, ...), accepted and unused.

    Returns:
        The ``np`` return values, rank 0 first.

    Raises:
        ValueError: ``np`` < 1, other hosts, ``use_mpi=True``.
        RuntimeError: a rank failed; the message names the root-cause rank and its error.

    Example:
        >>> def train(lr):
        ...     import shoal.torch as hvd
        ...     hvd.init()
        ...     return hvd.rank()
        >>> shoal.run(train, args=(0.1,), np=2)
        [0, 1]
    """
    if not isinstance(np, int) or isinstance(np, bool) or np < 1:
        raise ValueError(f"shoal: run(np={np!r}): np is the number of ranks, an int >= 1")
    _check_hosts(hosts, np)
    if use_mpi:
        raise ValueError("shoal: run(use_mpi=True): Shoal's ranks talk through torch.distributed (gloo on CPU, "
                         "NCCL on GPU), not an MPI controller. HINT: drop use_mpi (use_gloo is what happens).")
    extra_env = dict(env or {})
    if start_timeout is None:  # one knob for the whole start, as shoal run reads it
        start_timeout = _env.read_config(environ=_env.child_environ(extra_env)).start_timeout_s
    else:  # and the ranks wait as long in init()
        extra_env[env_name("start_timeout_s")] = str(float(start_timeout))
    return _launch(_call, (func, dict(kwargs or {}), *args), np, extra_env, bool(verbose), float(start_timeout))


def _call(func: Callable, kwargs: dict, *args: Any) -> Any:
    """What each rank runs (module level: torch names the entry point by its ``__qualname__``)."""
    return func(*args, **kwargs)


def _launch(target: Callable, args: tuple, np: int, extra_env: dict, verbose: bool, start_timeout_s: float) -> list:
    from torch.distributed.elastic.multiprocessing import Std  # noqa: PLC0415 (imports torch)

    from . import agent as _agent  # noqa: PLC0415
    from .launch import (_LINE_PREFIX_TEMPLATE, _MODULE, _MONITOR_INTERVAL_S, _SHUTDOWN_TIMEOUT_S,  # noqa: PLC0415
                         _quiet_torch_agent)
    from .sentinel import Sentinel  # noqa: PLC0415

    secret = secrets.token_hex(16)
    if np > 1 and _env.get_env("OMP_NUM_THREADS") is None:
        extra_env = {"OMP_NUM_THREADS": "1", **extra_env}  # as shoal run and torchrun do
    log_root = tempfile.mkdtemp(prefix="shoal-run-")
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    _quiet_torch_agent(verbose)
    sentinel = Sentinel.start(_MODULE, log_root)
    try:
        with _env.exported(extra_env, secret=secret):
            run_id = secrets.token_hex(16)
            sentinel.job(run_id, 0)
            logs = _agent.RememberingLogsSpecs(log_dir=log_root, tee=Std.ALL)
            store, port = _agent.open_store("127.0.0.1", 0, True, secret, start_timeout_s)
            agent = _agent.make_agent(
                store=store, master_addr="127.0.0.1", master_port=port, node_rank=0, nnodes=1, nproc=np,
                run_id=run_id, start_timeout_s=start_timeout_s, argv=(target, args), logs=logs,
                monitor_interval_s=_MONITOR_INTERVAL_S, shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S,
                log_line_prefix_template=_LINE_PREFIX_TEMPLATE, sentinel=sentinel)
            result = agent.run()
            if result.failures:
                host = socket.gethostname()
                failures = [failure_from_torch(rank, pf, logs.stderrs.get(pf.local_rank), host)
                            for rank, pf in result.failures.items()]
                root = blame(failures, [r for r in range(np) if r not in result.failures]).root
                raise RuntimeError(f"shoal: run(): rank {root.rank} failed: {root.what} ({len(failures)} of {np} "
                                   "ranks failed). HINT: each rank's output above carries its [rank<r>] prefix.")
            return [result.return_values[r] for r in range(np)]
    finally:
        sentinel.done()
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        shutil.rmtree(log_root, ignore_errors=True)
