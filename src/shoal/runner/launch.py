"""``shoal run``: start N ranks of a command on this host, or on several hosts.

Design constraints:

1. No process manager of our own (DESIGN.md, "What stays out"). On every host torch's elastic agent
   (:func:`torch.distributed.launcher.api.elastic_launch`, the machinery behind torchrun) starts,
   watches and stops the workers; this module only builds its ``LaunchConfig`` and reports.
2. One name per knob. The knob flags are generated from :class:`~shoal.core.config.ShoalConfig`;
   a flag the user gives reaches every worker as ``SHOAL_<FIELD>``; a flag not given changes nothing.
3. Fail loud, fast and first. The agent polls its workers every ``_MONITOR_INTERVAL_S``, so a dead
   rank is seen at once; the first line printed after a failure names the root-cause rank and its
   exception (from torch's per-worker error file, written by the worker shim) or signal; the exit
   status is non-zero whenever any rank fails.
4. Every output line names its rank (torch's tee plus a log-line prefix template).
5. Nothing is reachable beyond this machine unless hosts are given: the one-host rendezvous is
   torch's c10d store at 127.0.0.1 on a free port.
6. Several hosts: one agent per host through a remote-command template (ssh by default). ssh
   forwards no environment, so the knobs travel inside the agent's command line. One failing
   agent, or Ctrl-C, stops every agent.

Glossary:
    agent        torch's elastic agent, one per host, parent of that host's workers
    worker       one rank: the user's command
    shim         ``python -m shoal.runner.launch --worker ...``: runs a Python command in-process so
                 that an uncaught exception lands in torch's error file (``TORCHELASTIC_ERROR_FILE``)
    coordinator  the ``shoal run`` process of a multi-host job: starts the agents and watches them

What lives elsewhere: subcommand dispatch (:mod:`shoal.runner.cli`), the knobs themselves
(:mod:`shoal.core.config`), reading the environment (:mod:`shoal.core.env`), what workers do with
their variables (:func:`shoal.init`). Importing this module imports no torch (``shoal --help`` stays fast).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import faulthandler
import json
import logging
import os
import queue
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from shoal.core import env as _env
from shoal.core.config import ShoalConfig, choices_of, env_name, flag_name, knob_type, knobs

__all__ = [
    "add_arguments",
    "main",
    "launcher_options",
    "knob_environment",
    "parse_hosts",
    "parse_hostfile",
    "place_ranks",
    "DEFAULT_REMOTE_COMMAND",
    "EXIT_USAGE",
    "EXIT_LAUNCHER",
    "EXIT_INTERRUPTED",
]

log = logging.getLogger(__name__)

#: ssh never prompts in batch mode: a missing key fails at once instead of hanging the launch.
DEFAULT_REMOTE_COMMAND = "ssh -o BatchMode=yes {host}"
#: torchrun's default port, for the multi-host rendezvous (one host has no fixed port: it binds port 0).
_DEFAULT_MASTER_PORT = 29500
#: How often an agent polls its workers. torch's default is also 0.1 s; written out because
#: "a dead rank is noticed within 30 s" depends on it (constraint 3).
_MONITOR_INTERVAL_S = 0.1
#: After the first failure the agent sends SIGTERM to the other workers, then SIGKILL after this
#: long. torch's default is 30 s, which alone would eat the whole "exit within 30 s" budget.
_SHUTDOWN_TIMEOUT_S = 5
#: The coordinator's SIGKILL comes this long after it asked the agents to stop (their shutdown + slack).
_AGENT_STOP_GRACE_S = _SHUTDOWN_TIMEOUT_S + 5
#: ``[rank3]: text``; torch substitutes ${rank} with the global rank.
_LINE_PREFIX_TEMPLATE = "[rank${rank}]: "
#: Marks a remote agent's failure report on its stderr; the coordinator parses and hides these lines.
_REPORT_MARK = "shoal-agent-report: "
#: How workers (shim) and remote agents re-enter this module: ``python -m shoal.runner.launch``.
_MODULE = "shoal.runner.launch"

EXIT_USAGE = 2  #: bad flags, bad host list, command not found
EXIT_LAUNCHER = 1  #: the launch itself failed (rendezvous, remote command) with no rank to blame
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)  #: Ctrl-C, shell convention

# Words of torch/gloo errors that a rank raises when a *peer* went away (seen in gloo's
# "Connection closed by peer [addr]:port" and shoal's RankFailureError). Such a rank is a victim,
# not the root cause, even when its error file is stamped in the same second as the real one
# (error-file timestamps have one-second resolution).
_COLLATERAL_WORDS = ("RankFailureError", "closed by peer", "reset by peer", "Broken pipe",
                     "ECONNRESET", "Connection refused")


class _UsageError(ValueError):
    """A bad command line: printed as ``shoal run: error: ...``, exit status 2."""


# --------------------------------------------------------------------------------------- CLI


def _own_options(parser: argparse.ArgumentParser) -> None:
    """The launcher's own options (everything that is not a ShoalConfig knob)."""
    parser.add_argument("-np", "--num-proc", dest="num_proc", type=int, required=True, metavar="N",
                        help="Total number of ranks (processes).")
    parser.add_argument("-H", "--hosts", dest="hosts", metavar="HOST:SLOTS,...",
                        help="Hosts and their slots, e.g. a:2,b:2. Without hosts (and without "
                             "--hostfile) everything runs on this machine over loopback.")
    parser.add_argument("--hostfile", dest="hostfile", metavar="FILE",
                        help="File with one host per line: 'host slots=N', 'host:N' or 'host'.")
    parser.add_argument("--remote-command", dest="remote_command", default=DEFAULT_REMOTE_COMMAND,
                        metavar="TEMPLATE",
                        help="How to run a command on a host; {host} is replaced. Default: "
                             "%(default)r. Example for network namespaces: 'ip netns exec {host}'.")
    parser.add_argument("--master-addr", dest="master_addr", metavar="ADDR",
                        help="Address of the first host, where the rendezvous store listens "
                             "(default: the first host's name).")
    parser.add_argument("--master-port", dest="master_port", type=int, default=_DEFAULT_MASTER_PORT,
                        metavar="PORT", help="Port of the rendezvous store (default: %(default)s).")
    parser.add_argument("--start-timeout-s", dest="start_timeout_s", type=float, default=120.0,
                        metavar="SECONDS",
                        help="How long agents wait for each other at the rendezvous (default: "
                             "%(default)s).")
    parser.add_argument("-x", "--env", dest="env", action="append", default=[],
                        metavar="NAME[=VALUE]",
                        help="Also set this variable for the workers (repeatable). NAME alone "
                             "forwards this shell's value to remote hosts.")
    parser.add_argument("--log-dir", dest="log_dir", metavar="DIR",
                        help="Keep each rank's stdout/stderr/error files under DIR (default: a "
                             "temporary directory, removed at exit).")
    parser.add_argument("--verbose", dest="verbose", action="store_true",
                        help="Show the elastic agent's own log lines.")
    parser.add_argument("program", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                        help="The command every rank runs, e.g. python train.py --epochs 3.")


def _knob_base_type(f: dataclasses.Field) -> type:
    return knob_type(f)[0]


def _knob_metavar(f: dataclasses.Field, base: type) -> str:
    if f.name.endswith("_mb"):
        return "MB"
    if f.name.endswith("_s"):
        return "SECONDS"
    return "N" if base is int else f.name.rsplit("_", 1)[-1].upper()  # e.g. INTERFACE, FILENAME


def _knob_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ShoalConfig field, generated (constraint 2). Every default is None, so that
    only the flags the user typed become variables."""
    group = parser.add_argument_group(
        "shoal knobs", "Each flag given is passed to every rank as SHOAL_<NAME> (see ShoalConfig).")
    for f in knobs():
        base = _knob_base_type(f)
        shown = f"default: {f.default}" if f.default is not None else "default: automatic"
        # argparse %-formats help strings: escape the knobs' own percent signs ("1% of ...").
        help_text = f"{f.metadata.get('help', '')} [{env_name(f.name)}; {shown}]".replace("%", "%%")
        if base is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
            continue
        group.add_argument(flag_name(f.name), dest=f.name, type=base, default=None,
                           choices=choices_of(f), metavar=_knob_metavar(f, base)
                           if not choices_of(f) else None, help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``shoal run``'s options to ``parser`` (called by :mod:`shoal.runner.cli`)."""
    # A frozen CLI: "--hier" must not silently mean "--hierarchical" (nor "--host" "--hostfile").
    parser.allow_abbrev = False
    parser.epilog = ("Exit status: 0 when every rank succeeded; the root-cause rank's exit code, "
                     "or 128+N when it died of signal N; 2 for a bad command line; 1 when the "
                     "launch itself failed; 130 on Ctrl-C. See docs/launcher.md.")
    _own_options(parser)
    _knob_options(parser)


def launcher_options() -> set[str]:
    """Long option names of the launcher's own options (not knobs); the CLI freeze test uses it."""
    probe = argparse.ArgumentParser(add_help=False)
    _own_options(probe)
    return {s for a in probe._actions for s in a.option_strings if s.startswith("--")}


def knob_environment(args: argparse.Namespace) -> dict[str, str]:
    """``SHOAL_<FIELD>`` for every knob flag given on the command line, validated.

    Raises:
        ValueError: a value is out of range (the message names the knob, from ShoalConfig.validate).

    Example:
        >>> knob_environment(argparse.Namespace(autotune=False, num_streams=3, ...))
        {'SHOAL_NUM_STREAMS': '3', 'SHOAL_AUTOTUNE': 'false'}
    """
    out = {}
    for f in knobs():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        out[env_name(f.name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    _env.read_config(environ=out)  # the same parser and range checks the workers will apply
    return out


# --------------------------------------------------------------------------------------- hosts


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """``"a:2,b:2"`` -> ``[("a", 2), ("b", 2)]``; a host without ``:SLOTS`` has one slot.

    Raises:
        ValueError: an empty host, a repeated host, or slots that are not a positive integer.
    """
    hosts: list[tuple[str, int]] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        hosts.append((name.strip(), _slots(slots, item)))
    return _check_hosts(hosts, text)


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """Read a host file: one ``host slots=N``, ``host:N`` or ``host`` per line; ``#`` comments.

    Raises:
        ValueError: a line that does not parse (the message names the file and line).
    """
    hosts: list[tuple[str, int]] = []
    with open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(\S+?)(?::(\S+)|\s+slots\s*=\s*(\S+))?", line)
            if not m:
                raise ValueError(f"shoal: {path}:{lineno}: cannot parse {line!r}. "
                                 "HINT: write 'host slots=N' or 'host:N'.")
            hosts.append((m.group(1), _slots(m.group(2) or m.group(3) or "1", f"{path}:{lineno}")))
    return _check_hosts(hosts, path)


def _slots(text: str, where: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"shoal: slots must be a positive integer, got {text!r} in {where!r}. "
                         "HINT: write host:2 for two ranks on host.")
    return n


def _check_hosts(hosts: list[tuple[str, int]], where: str) -> list[tuple[str, int]]:
    names = [h for h, _ in hosts]
    if not hosts or any(not h for h in names):
        raise ValueError(f"shoal: no usable host in {where!r}. HINT: -H host1:2,host2:2")
    dup = sorted({h for h in names if names.count(h) > 1})
    if dup:
        raise ValueError(f"shoal: host(s) {', '.join(dup)} listed twice in {where!r}. "
                         "HINT: give each host once with its total slots, e.g. a:4.")
    return hosts


def place_ranks(hosts: Sequence[tuple[str, int]], num_proc: int) -> list[tuple[str, int]]:
    """Fill hosts in order: ``place_ranks([("a", 2), ("b", 2)], 3)`` -> ``[("a", 2), ("b", 1)]``.

    Hosts left with no rank are dropped; global ranks follow this order (host a holds ranks 0, 1).

    Raises:
        ValueError: ``num_proc`` exceeds the total number of slots.
    """
    total = sum(s for _, s in hosts)
    if num_proc > total:
        listed = ", ".join(f"{h}:{s}" for h, s in hosts)
        raise ValueError(f"shoal: -np {num_proc} but the hosts have {total} slots ({listed}). "
                         "HINT: lower -np or add slots.")
    placed, left = [], num_proc
    for host, slots in hosts:
        take = min(slots, left)
        if take:
            placed.append((host, take))
        left -= take
    return placed


# ------------------------------------------------------------------------------- agent plan


@dataclass(slots=True)
class _AgentPlan:
    """Everything one agent needs; JSON-serializable so that it can ride a remote command line."""

    command: list[str]
    nproc: int
    host: str = ""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""  # empty: one host, c10d rendezvous on loopback
    master_port: int = 0
    run_id: str = ""
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Optional[str] = None
    start_timeout_s: float = 120.0
    verbose: bool = False
    report_json: bool = False  # remote agents report failures as marked JSON lines
    watch_stdin: bool = False  # remote agents stop when the coordinator's pipe closes


def _encode_plan(plan: _AgentPlan) -> str:
    """One token of [A-Za-z0-9_-=]: survives ssh's re-joining of arguments and any remote shell."""
    return base64.urlsafe_b64encode(json.dumps(dataclasses.asdict(plan)).encode()).decode()


def _decode_plan(token: str) -> _AgentPlan:
    return _AgentPlan(**json.loads(base64.urlsafe_b64decode(token.encode())))


# ------------------------------------------------------------------------------ worker argv

# Interpreter options that take no argument and leave `-m shoal.runner.launch` importable
# (not -S: no site-packages; not -i: interactive).
_PLAIN_PY_OPTS = re.compile(r"-[bBdEOqRuvIP]+")


def _is_shoals_python(path: str) -> bool:
    """True for an interpreter of this environment (same bin directory as the one running shoal).

    Not a realpath comparison: a venv's ``python`` is a symlink to the system one, which has no shoal.
    """
    return bool(re.fullmatch(r"python[0-9.]*", os.path.basename(path))) and \
        os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(sys.executable))


def _worker_argv(command: Sequence[str]) -> list[str]:
    """What torch's agent runs for each rank (in ``--no-python`` style: the command as given).

    ``python [opts] (-c CODE | -m MOD | SCRIPT) ARGS`` of this environment runs through the shim
    (``-u`` added, as torchrun does, so that output is not held back in a buffer); anything else
    runs unchanged and falls back to its stderr's last line for the failure summary.

    Raises:
        _UsageError: the program is not found on PATH.
    """
    path = shutil.which(command[0])
    if path is None:
        raise _UsageError(f"shoal: command not found: {command[0]!r}. HINT: check PATH, or give "
                          "the full path of the program.")
    if not _is_shoals_python(path):
        return [path, *command[1:]]
    opts, i = [], 1
    while i < len(command):
        tok = command[i]
        if tok in ("-c", "-m") and i + 1 < len(command):
            return [path, *opts, "-u", "-m", _MODULE, "--worker", *command[i:]]
        if tok in ("-X", "-W") and i + 1 < len(command):
            opts += command[i:i + 2]
            i += 2
        elif tok.startswith(("-X", "-W")) or _PLAIN_PY_OPTS.fullmatch(tok):
            opts.append(tok)
            i += 1
        elif tok.startswith("-"):
            break  # an option we do not know: run the command unchanged
        else:
            return [path, *opts, "-u", "-m", _MODULE, "--worker", *command[i:]]
    return [path, *command[1:]]


# ---------------------------------------------------------------------------------- failures


@dataclass(slots=True)
class _Failure:
    """One failed rank (or, with ``rank`` None, an agent that failed before its ranks ran)."""

    rank: Optional[int]
    host: str
    what: str  # one line: "ZeroDivisionError: division by zero", "killed by SIGKILL (signal 9)"
    exitcode: int = 1  # negative: killed by that signal (Popen's convention)
    pid: Optional[int] = None
    timestamp: float = 0.0
    collateral: bool = False  # failed because a peer went away
    stopped: bool = False  # SIGTERM'd by an agent after another rank failed

    def sort_key(self) -> tuple:
        return (self.stopped, self.collateral, self.timestamp,
                self.rank if self.rank is not None else -1)

    def who(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"agent on host {self.host}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _last_line(path: Optional[str]) -> str:
    """Last non-empty line of a worker's stderr log (the fallback when there is no error file)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as fh:
        lines = [ln.strip() for ln in fh.read()[-8192:].splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _failure_from_torch(rank: int, pf: Any, stderr_log: Optional[str], host: str) -> _Failure:
    """Turn torch's ``ProcessFailure`` into a :class:`_Failure` (error file first, then the log)."""
    message = pf.message.get("message", "") if isinstance(pf.message, dict) else str(pf.message or "")
    from_error_file = isinstance(pf.message, dict) and bool(message)
    if pf.exitcode < 0:
        what = f"killed by {_signal_name(-pf.exitcode)} (signal {-pf.exitcode})"
    elif from_error_file:
        what = message.strip().splitlines()[0] if message.strip() else f"exit code {pf.exitcode}"
    else:
        line = _last_line(stderr_log)
        what = f"exit code {pf.exitcode}" + (f": {line}" if line else "")
    return _Failure(rank=rank, host=host, what=what, exitcode=pf.exitcode, pid=pf.pid,
                    timestamp=float(pf.timestamp),
                    collateral=any(w in what for w in _COLLATERAL_WORDS),
                    stopped=pf.exitcode == -signal.SIGTERM)


def _exit_status(root: _Failure) -> int:
    if root.exitcode < 0:
        return 128 + (-root.exitcode)
    return root.exitcode or EXIT_LAUNCHER


def _print_summary(failures: list[_Failure], world_size: int, log_dir: Optional[str]) -> None:
    """The failure report: the root cause first, on one line, before anything else."""
    root, *others = sorted(failures, key=_Failure.sort_key)
    out = sys.stderr
    print(f"shoal: {root.who()} failed: {root.what}", file=out)
    for f in others:
        what = f"stopped by shoal after {root.who()} failed" if f.stopped else f.what
        print(f"shoal:   then {f.who()}: {what}", file=out)
    ranks = sorted({f.rank for f in failures if f.rank is not None and not f.stopped})
    code = _exit_status(root)
    if root.rank is None:
        print(f"shoal: the launch failed on host {root.host} before its ranks could run; exit status "
              f"{code}. HINT: check the messages above: the remote command, the rendezvous address "
              "(--master-addr/--master-port reachable from every host), the command on that host's "
              "PATH.", file=out, flush=True)
        return
    where = f"logs in {log_dir}" if log_dir else "rerun with --log-dir DIR to keep each rank's logs"
    print(f"shoal: {len(ranks)} of {world_size} ranks failed; exit status {code}. HINT: the root "
          f"cause is {root.who()}: its output above carries the prefix [rank{root.rank}]; {where}.",
          file=out, flush=True)


# ------------------------------------------------------------------------------------ agent


def _quiet_torch_agent(verbose: bool) -> None:
    # The agent logs each step of a failure ("Sending process ... closing signal", "failed
    # (exitcode: 1)") at WARNING/ERROR, which would bury the one-line root cause (constraint 3);
    # our summary carries the same facts, and --verbose keeps them. Only torch's elastic loggers
    # are touched (never the root logger), only in the launcher process, and each one by name:
    # torch sets a level on every elastic logger it creates (from LOGLEVEL), so a level on the
    # parent alone would not reach them. All exist once torch.distributed.launcher.api is imported.
    if verbose:
        return
    prefix = "torch.distributed.elastic"
    names = [n for n in logging.root.manager.loggerDict if n == prefix or n.startswith(prefix + ".")]
    for name in names + [prefix]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run_agent(plan: _AgentPlan) -> tuple[int, list[_Failure]]:
    """Run this host's share of the job in torch's elastic agent, in this process.

    Returns:
        (exit status, failures); failures are empty on success.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # noqa: PLC0415

    class _RememberingLogsSpecs(DefaultLogsSpecs):
        """torch's default log layout, remembering where each local rank's stderr went (a rank
        without an error file is summarized by its stderr's last line)."""

        stderrs: dict[int, str] = {}

        def reify(self, envs):
            dest = super().reify(envs)
            self.stderrs = dict(dest.stderrs)
            return dest

    host = plan.host or socket.gethostname()
    _quiet_torch_agent(plan.verbose)
    # torch's tee threads write each rank's lines to our stdout; into a pipe (a remote command, a
    # CI log) Python would hold them in a block buffer until exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    _env.export_env(plan.env, "shoal run flags")
    if plan.nproc > 1:
        # torchrun does the same: N ranks x all-cores OpenMP pools oversubscribe the CPU.
        _env.set_default_env("OMP_NUM_THREADS", "1", "several ranks share this host's cores")
    argv = _worker_argv(plan.command)
    log_root = plan.log_dir or tempfile.mkdtemp(prefix="shoal-run-")
    os.makedirs(log_root, exist_ok=True)
    logs = _RememberingLogsSpecs(log_dir=log_root, tee=Std.ALL)
    if plan.master_addr:
        # Static rendezvous: torch's c10d TCPStore on the first host, node rank = host order.
        # (The dynamic c10d rendezvous numbers nodes by sorting their descriptors, see
        # dynamic_rendezvous.py `enumerate(sorted(state.participants))`, so rank 0 could land on
        # any host; -H order must decide it.)
        backend, endpoint, local_addr = "static", f"{plan.master_addr}:{plan.master_port}", None
        rdzv_configs: dict[str, Any] = {"rank": plan.node_rank, "timeout": int(plan.start_timeout_s)}
    else:
        # One host: the c10d store on loopback, free port (no clash between concurrent jobs).
        backend, endpoint, local_addr = "c10d", "127.0.0.1:0", "127.0.0.1"
        rdzv_configs = {"is_host": True, "join_timeout": int(plan.start_timeout_s)}
    config = LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc,
        run_id=plan.run_id or uuid.uuid4().hex, role="worker", rdzv_backend=backend,
        rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs, max_restarts=0,
        monitor_interval=_MONITOR_INTERVAL_S, logs_specs=logs,
        log_line_prefix_template=_LINE_PREFIX_TEMPLATE, local_addr=local_addr,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    log.debug("shoal: agent on %s runs %s with %s", host, argv, config)
    try:
        elastic_launch(config, argv[0])(*argv[1:])
        return 0, []
    except ChildFailedError as exc:
        failures = []
        for rank, pf in exc.failures.items():
            failures.append(_failure_from_torch(rank, pf, logs.stderrs.get(pf.local_rank), host))
        failures.sort(key=_Failure.sort_key)
        return _exit_status(failures[0]), failures
    except SignalException as exc:
        # Ctrl-C or SIGTERM: torch's agent already stopped the workers.
        return 128 + int(exc.sigval), []
    except Exception as exc:  # rendezvous or start-up failure: no rank to blame
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return EXIT_LAUNCHER, [_Failure(rank=None, host=host, what=f"{type(exc).__name__}: {text}",
                                        timestamp=time.time())]
    finally:
        # torch's agent left its handlers installed: they raise SignalException, which a second
        # SIGTERM (the coordinator's escalation) would throw into interpreter shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not plan.log_dir:
            shutil.rmtree(log_root, ignore_errors=True)


def _agent_main(token: str) -> int:
    """Entry of a remote agent: ``python -m shoal.runner.launch --agent PLAN``."""
    plan = _decode_plan(token)
    if plan.watch_stdin:
        threading.Thread(target=_stop_when_stdin_closes, name="shoal-stdin-watch", daemon=True).start()
    try:
        code, failures = _run_agent(plan)
    except _UsageError as exc:  # e.g. the command is not on this host's PATH
        code, failures = EXIT_USAGE, [_Failure(rank=None, host=plan.host, what=str(exc))]
    for f in failures:
        print(_REPORT_MARK + json.dumps(dataclasses.asdict(f)), file=sys.stderr, flush=True)
    return code


def _stop_when_stdin_closes() -> None:
    # ssh does not pass signals to the remote command, but it closes the remote stdin when the
    # local ssh client dies; the coordinator stops a remote agent by killing that client.
    # os.read on the raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered
    # reader aborts the interpreter at exit ("could not acquire lock for <stdin>", seen here).
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


# ------------------------------------------------------------------------------ coordinator


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(_signal_name(signum))
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise _Interrupted(signum)


def _pump_stderr(stream: Any, index: int, host: str, reports: "queue.Queue", tails: list[str]) -> None:
    """Forward an agent's stderr, except its report lines, which go to ``reports``."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if line.startswith(_REPORT_MARK):
            try:
                reports.put((index, _Failure(**json.loads(line[len(_REPORT_MARK):]))))
                continue
            except (ValueError, TypeError):
                pass
        if line.strip():
            tails[index] = line.strip()
        sys.stderr.write(line)
        sys.stderr.flush()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _run_hosts(plans: list[_AgentPlan], remote_command: str, world_size: int) -> int:
    """Start one agent per host through ``remote_command`` and watch them (constraint 6).

    Stopping is staged so that each agent can stop its own workers (they run in their own
    sessions, out of reach of a process-group kill here): close its stdin (the agent sends itself
    SIGTERM; the only signal that crosses ssh), then SIGTERM the remote command's process group
    (for templates that do not pass stdin), then SIGKILL.
    """
    procs: list[subprocess.Popen] = []
    reports: "queue.Queue[tuple[int, _Failure]]" = queue.Queue()
    tails = [""] * len(plans)
    asked_to_stop = [False] * len(plans)
    pumps = []
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    interrupted: Optional[int] = None
    stop_at: Optional[float] = None
    termed: set[int] = set()
    try:
        try:
            for i, plan in enumerate(plans):
                argv = shlex.split(remote_command.format(host=plan.host)) + [
                    sys.executable, "-m", _MODULE, "--agent", _encode_plan(plan)]
                log.debug("shoal: host %s: %s", plan.host, argv)
                # Own session: a Ctrl-C reaches only the coordinator, which stops agents in order.
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
                procs.append(proc)
                t = threading.Thread(target=_pump_stderr, name=f"shoal-agent-{plan.host}",
                                     args=(proc.stderr, i, plan.host, reports, tails), daemon=True)
                t.start()
                pumps.append(t)
            while not all(p.poll() is not None for p in procs):
                bad = reports.qsize() > 0 or any(p.poll() not in (None, 0) for p in procs)
                if bad and stop_at is None:
                    stop_at = time.monotonic()
                    for i, p in enumerate(procs):
                        asked_to_stop[i] = p.poll() is None
                if stop_at is not None:
                    _stop_agents(procs, time.monotonic() - stop_at, termed)
                time.sleep(0.05)
        except (KeyboardInterrupt, _Interrupted) as exc:
            interrupted = exc.signum if isinstance(exc, _Interrupted) else int(signal.SIGINT)
            print(f"shoal: interrupted ({_signal_name(interrupted)}); stopping all agents",
                  file=sys.stderr, flush=True)
            t0 = time.monotonic()
            while any(p.poll() is None for p in procs):
                _stop_agents(procs, time.monotonic() - t0, termed)
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    if interrupted is not None:
        return 128 + interrupted
    failures: list[_Failure] = []
    while not reports.empty():
        _, f = reports.get()
        f.timestamp = len(failures)  # across hosts: order of arrival (host clocks differ)
        failures.append(f)
    reported = {f.host for f in failures}
    for i, (plan, proc) in enumerate(zip(plans, procs)):
        if proc.returncode != 0 and plan.host not in reported:
            code = proc.returncode
            what = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            failures.append(_Failure(
                rank=None, host=plan.host, what=f"remote command {what}"
                + (f": {tails[i]}" if tails[i] else ""), exitcode=EXIT_LAUNCHER,
                timestamp=len(failures), stopped=asked_to_stop[i] and code in _STOPPED_CODES))
    if not failures:
        return 0
    _print_summary(failures, world_size, plans[0].log_dir)
    return _exit_status(sorted(failures, key=_Failure.sort_key)[0])


#: How an agent we asked to stop ends: by SIGTERM/SIGKILL, or exiting 128+N after handling it
#: (which is also what ssh relays).
_STOPPED_CODES = {-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL}


def _stop_agents(procs: list[subprocess.Popen], elapsed_s: float, termed: set[int]) -> None:
    """One step of the staged stop (see :func:`_run_hosts`), ``elapsed_s`` after it began."""
    for p in procs:
        if p.poll() is not None:
            continue
        if p.stdin and not p.stdin.closed:
            try:
                p.stdin.close()
            except OSError:
                pass
        # An agent gets _SHUTDOWN_TIMEOUT_S to stop its workers; a signal before that could cut
        # its shutdown short and orphan them.
        if elapsed_s > _SHUTDOWN_TIMEOUT_S + 2 and p.pid not in termed:
            _signal_group(p, signal.SIGTERM)
            termed.add(p.pid)
        if elapsed_s > _AGENT_STOP_GRACE_S:
            _signal_group(p, signal.SIGKILL)


# -------------------------------------------------------------------------------------- main


def _extra_env(items: Sequence[str], remote: bool) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _UsageError(f"shoal: -x {item!r}: not a variable name. HINT: -x NAME=VALUE or -x NAME.")
        if sep:
            out[name] = value
        elif remote:
            current = _env.get_env(name)
            if current is None:
                raise _UsageError(f"shoal: -x {name}: {name} is not set in this shell. "
                                  f"HINT: export it first or write -x {name}=VALUE.")
            out[name] = current
    return out


def main(args: argparse.Namespace) -> int:
    """Run ``shoal run``; returns the exit status (see the module's EXIT_* constants).

    Example:
        $ shoal run -np 2 python -c "import shoal.torch as hvd; hvd.init(); print(hvd.rank())"
        [rank0]: 0
        [rank1]: 1
    """
    try:
        return _main(args)
    except KeyboardInterrupt:  # before torch's agent installed its own handler
        print("shoal: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (_UsageError, ValueError, OSError) as exc:
        text = str(exc)
        print(f"shoal run: error: {text[7:] if text.startswith('shoal: ') else text}", file=sys.stderr)
        return EXIT_USAGE


def _main(args: argparse.Namespace) -> int:
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        raise _UsageError("shoal: no command to run. HINT: shoal run -np 2 python train.py")
    if args.num_proc < 1:
        raise _UsageError(f"shoal: -np must be >= 1, got {args.num_proc}.")
    knob_env = knob_environment(args)
    if args.hosts and args.hostfile:
        raise _UsageError("shoal: give -H or --hostfile, not both.")
    hosts = parse_hosts(args.hosts) if args.hosts else \
        parse_hostfile(args.hostfile) if args.hostfile else None
    log_dir = os.path.abspath(args.log_dir) if args.log_dir else None
    if hosts is None:
        _worker_argv(program)  # command not found -> usage error before anything starts
        plan = _AgentPlan(command=program, nproc=args.num_proc,
                          env={**knob_env, **_extra_env(args.env, remote=False)},
                          log_dir=log_dir, start_timeout_s=args.start_timeout_s, verbose=args.verbose)
        code, failures = _run_agent(plan)
        if failures:
            _print_summary(failures, args.num_proc, log_dir)
        elif code >= 128:
            print(f"shoal: interrupted ({_signal_name(code - 128)}); all ranks stopped",
                  file=sys.stderr, flush=True)
        return code
    placed = place_ranks(hosts, args.num_proc)
    # ssh forwards no environment: SHOAL_* of this shell, then the flags, then -x, all explicit.
    forwarded = {env_name(f.name): v for f in knobs() if (v := _env.get_env(env_name(f.name))) is not None}
    forwarded.update(knob_env)
    forwarded.update(_extra_env(args.env, remote=True))
    if "{host}" not in args.remote_command:
        raise _UsageError(f"shoal: --remote-command {args.remote_command!r} has no {{host}}. "
                          "HINT: e.g. 'ssh -o BatchMode=yes {host}'.")
    run_id = uuid.uuid4().hex
    plans = [_AgentPlan(command=program, nproc=n, host=h, nnodes=len(placed), node_rank=i,
                        master_addr=args.master_addr or placed[0][0], master_port=args.master_port,
                        run_id=run_id, env=forwarded, log_dir=log_dir,
                        start_timeout_s=args.start_timeout_s, verbose=args.verbose,
                        report_json=True, watch_stdin=True)
             for i, (h, n) in enumerate(placed)]
    return _run_hosts(plans, args.remote_command, args.num_proc)


# ------------------------------------------------------------------------------------- shim


def _shim_main(argv: list[str]) -> int:
    """Run ``-c CODE | -m MODULE | SCRIPT`` with ARGS in this interpreter, as ``python`` would, but
    write an uncaught exception to torch's error file first (the ``@record`` idea, applied from
    outside so that user scripts need no decorator)."""
    faulthandler.enable(all_threads=True)  # a segfaulting rank still shows its stacks
    mode = argv[0]
    try:
        if mode == "-c":
            sys.argv = ["-c", *argv[2:]]
            main_module = types.ModuleType("__main__")
            sys.modules["__main__"] = main_module
            exec(compile(argv[1], "<string>", "exec"), main_module.__dict__)  # noqa: S102
        elif mode == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(mode))
            runpy.run_path(mode, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 (recorded, printed, exit 1 like python)
        tb = exc.__traceback__
        # Hide the shim's and runpy's frames (3.11 names the latter "<frozen runpy>"): the
        # traceback then starts at the user's code, as under plain python.
        skip = {__file__, runpy.__file__, "<frozen runpy>"}
        while tb is not None and tb.tb_frame.f_code.co_filename in skip:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
        # After printing: recording may import torch (seconds, when the code had not), and a rank
        # stopped meanwhile should still have shown its traceback.
        _record_exception(exc)
        return 1
    return 0


def _record_exception(exc: BaseException) -> None:
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # noqa: PLC0415
    except ImportError:  # no torch in this interpreter: the stderr fallback will do
        return
    ErrorHandler().record_exception(exc)


def _module_main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"] and len(argv) > 1:
        return _shim_main(argv[1:])
    if argv[:1] == ["--agent"] and len(argv) == 2:
        return _agent_main(argv[1])
    print("usage: python -m shoal.runner.launch (--worker COMMAND... | --agent PLAN); "
          "this is shoal run's internal entry, use `shoal run` instead", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
