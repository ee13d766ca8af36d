"""``shoal run``: start N ranks of a command on this host, or on several hosts.

Design constraints:

1. No process manager or rendezvous of our own (DESIGN.md, "What stays out"). On every host torch's
   elastic agent (``LocalElasticAgent`` with torch's static rendezvous, the machinery behind
   torchrun, composed in :mod:`shoal.runner.agent`) starts, watches and stops the workers; this
   module plans the agents and reports.
2. One name per knob. The knob flags are generated from :class:`~shoal.core.config.ShoalConfig`;
   a flag the user gives reaches every worker as ``SHOAL_<FIELD>``; a flag not given changes nothing.
   Every knob value, given or inherited from the shell, is checked before a rank starts.
3. Fail loud, fast and first. The agent polls its workers every ``_MONITOR_INTERVAL_S``, so a dead
   rank is seen at once; the first line printed after a failure names the root-cause rank: the one
   the ranks' own errors named (structured fields in torch's per-worker error file, written by the
   worker shim), else the rank's exception or signal (:mod:`shoal.runner.report`); the exit status
   is non-zero whenever any rank fails.
4. Every output line names its rank (torch's tee plus a log-line prefix template).
5. Nothing listens beyond what the job needs: the store binds 127.0.0.1 when every rank is on this
   host and the master address otherwise, and every key of the job lives under a per-job secret
   (:mod:`shoal.runner.agent`; docs/launcher.md, "Threat model").
6. Several hosts: one agent per host through a remote-command template (ssh by default), with host
   names validated and the remote command quoted (:mod:`shoal.runner.hosts`). ssh forwards no
   environment, so the knobs travel inside the agent's command line, and the job's secret on its
   stdin (never in an argv, which any local user can read). One failing agent, or Ctrl-C, stops
   every agent.
7. Nothing outlives the launcher: if an agent dies without stopping its ranks (SIGKILL), its
   sentinel stops them and removes its temporary directory (:mod:`shoal.runner.sentinel`); a remote
   agent stops itself when its stdin (the coordinator's pipe) closes.

Glossary:
    agent        torch's elastic agent, one per host, parent of that host's workers
    worker       one rank: the user's command
    shim         ``python -m shoal.runner.launch --worker ...``: runs a Python command in-process so
                 that an uncaught exception lands in torch's error file (``TORCHELASTIC_ERROR_FILE``)
    coordinator  the ``shoal run`` process of a multi-host job: starts the agents and watches them
    sentinel     a small process per agent that stops its workers if the agent dies first

What lives elsewhere: elastic mode, on one host or several (:mod:`shoal.runner.elastic`: its agents start
through :func:`_start_remote_agent` too), subcommand dispatch (:mod:`shoal.runner.cli`), the knobs themselves
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
import secrets
import select
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
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from shoal.core import env as _env
from shoal.core.config import ShoalConfig, choices_of, env_name, flag_name, knob_type, knobs

from .hosts import (DEFAULT_REMOTE_COMMAND, check_remote_command, parse_address,
                    parse_hostfile, parse_hosts, place_ranks, remote_argv)
from .report import (EXIT_LAUNCHER, Failure, blame, exit_status, failure_from_torch, print_summary,
                     record_exception, signal_name)
from .sentinel import Sentinel, sentinel_main

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
#: Marks a remote agent's report on its stderr; the coordinator parses and hides these lines.
_REPORT_MARK = "shoal-agent-report: "
#: How workers (shim), remote agents and sentinels re-enter this module: ``python -m shoal.runner.launch``.
_MODULE = "shoal.runner.launch"
#: Bytes of randomness of the job's secret (constraint 5) and of torch's run id.
_SECRET_BYTES = 16

EXIT_USAGE = 2  #: bad flags, bad host list, command not found
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)  #: Ctrl-C, shell convention


class _UsageError(ValueError):
    """A bad command line: printed as ``shoal run: error: ...``, exit status 2."""


# --------------------------------------------------------------------------------------- CLI


def _own_options(parser: argparse.ArgumentParser) -> None:
    """The launcher's own options (everything that is not a ShoalConfig knob)."""
    parser.add_argument("-np", "--num-proc", dest="num_proc", type=int, required=True, metavar="N",
                        help="Total number of ranks (processes).")
    parser.add_argument("-H", "--hosts", dest="hosts", metavar="HOST:SLOTS,...",
                        help="Hosts and their slots, e.g. a:2,10.0.0.2:2,[fd00::3]:2 (DNS names, IPv4, "
                             "IPv6 in brackets). Without hosts (and without --hostfile) everything "
                             "runs on this machine over loopback.")
    parser.add_argument("--hostfile", dest="hostfile", metavar="FILE",
                        help="File with one host per line: 'host slots=N', 'host:N' or 'host'.")
    parser.add_argument("--remote-command", dest="remote_command", default=DEFAULT_REMOTE_COMMAND,
                        metavar="TEMPLATE",
                        help="How to run a command on a host; {host} is its one field. Default: "
                             "%(default)r (for ssh, shoal adds '--' before the host and quotes the "
                             "remote command). Example for network namespaces: 'ip netns exec {host}'.")
    parser.add_argument("--master-addr", dest="master_addr", metavar="ADDR",
                        help="Address of the first host, where the rendezvous store listens "
                             "(default: the first host's name). Elastic mode: an address of this host, "
                             "which holds the job's store (default: this host's address on the route to "
                             "the first other host).")
    parser.add_argument("--master-port", dest="master_port", type=int, default=_DEFAULT_MASTER_PORT,
                        metavar="PORT", help="Port of the rendezvous store (default: %(default)s).")
    parser.add_argument("-x", "--env", dest="env", action="append", default=[],
                        metavar="NAME[=VALUE]",
                        help="Also set this variable for the workers (repeatable). NAME alone "
                             "forwards this shell's value to remote hosts.")
    parser.add_argument("--log-dir", dest="log_dir", metavar="DIR",
                        help="Keep each rank's stdout/stderr/error files under DIR (default: a "
                             "temporary directory, removed at exit).")
    parser.add_argument("--verbose", dest="verbose", action="store_true",
                        help="Show the elastic agent's own log lines.")
    elastic = parser.add_argument_group(
        "elastic training", "Any of these makes the job elastic: a dead, hung or leaving worker, or a lost "
        "host, costs seconds, not the job; new workers join at the next commit. With -H/--hostfile this "
        "process coordinates one agent per host and holds the job's store: its own loss ends the job "
        "(docs/elastic.md).")
    elastic.add_argument("--elastic", dest="elastic", action="store_true",
                         help="Elastic mode with -np as both the minimum and the maximum.")
    elastic.add_argument("--min-np", dest="min_np", type=int, metavar="N",
                         help="Fewest workers the job runs with (default: -np).")
    elastic.add_argument("--max-np", dest="max_np", type=int, metavar="N",
                         help="Most workers the job runs with (default: -np).")
    elastic.add_argument("--host-discovery-script", dest="host_discovery_script", metavar="SCRIPT",
                         help="Prints 'host:slots' lines, checked every second; the job keeps as many "
                              "workers as the listed slots (between --min-np and --max-np). Hosts other "
                              "than this one get an agent through --remote-command as they appear; a host "
                              "that disappears has its workers leave at their next commit. Not with -H.")
    elastic.add_argument("--max-restarts", dest="max_restarts", type=int, default=10, metavar="N",
                         help="Most workers started to replace failed or departed ones (default: "
                              "%(default)s).")
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
        if f.name == "compression":  # a name, maybe with parameters: powersgd:rank=4 (shoal.core.compression)
            group.add_argument(flag_name(f.name), dest=f.name, type=_compression_flag, default=None,
                               metavar="{" + ",".join(choices_of(f)) + "}[:PARAMS]", help=help_text)
            continue
        group.add_argument(flag_name(f.name), dest=f.name, type=base, default=None,
                           choices=choices_of(f), metavar=_knob_metavar(f, base)
                           if not choices_of(f) else None, help=help_text)


def _compression_flag(value: str) -> str:
    """``--compression``: one of the names, parameters allowed after a colon (checked with the other
    knobs by :func:`knob_environment`); argparse's own wording for an unknown name."""
    names = choices_of(next(f for f in knobs() if f.name == "compression"))
    if value.partition(":")[0] not in names:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(names)})")
    return value


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


# ------------------------------------------------------------------------------- agent plan


@dataclass(slots=True)
class _AgentPlan:
    """Everything one agent needs; JSON-serializable so that it can ride a remote command line.

    Never the job's secret: a command line is readable by every local user (``ps``); the secret
    reaches a remote agent on its stdin (constraint 6)."""

    command: list[str]
    nproc: int
    host: str = ""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""  # empty: one host, the store on loopback
    master_port: int = 0  # 0: a free port (one host)
    run_id: str = ""  # torch's run id; empty: a random one
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Optional[str] = None
    start_timeout_s: float = 120.0
    verbose: bool = False


def _encode_json(value: Any) -> str:
    """One token of [A-Za-z0-9_-=]: survives ssh's re-joining of arguments and any remote shell."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _encode_plan(plan: _AgentPlan) -> str:
    return _encode_json(dataclasses.asdict(plan))


def _decode_json(token: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(token.encode()))


def _decode_plan(token: str) -> _AgentPlan:
    return _AgentPlan(**_decode_json(token))


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


def _python_target(command: Sequence[str]) -> tuple[list[str], int]:
    """For ``python [opts] (-c CODE | -m MOD | SCRIPT) ...``: the options we can keep, and the index of
    ``-c``/``-m``/SCRIPT in ``command``; index -1 when an option we do not know comes first."""
    opts, i = [], 1
    while i < len(command):
        tok = command[i]
        if tok in ("-c", "-m") and i + 1 < len(command):
            return opts, i
        if tok in ("-X", "-W") and i + 1 < len(command):
            opts += command[i:i + 2]
            i += 2
        elif tok.startswith(("-X", "-W")) or _PLAIN_PY_OPTS.fullmatch(tok):
            opts.append(tok)
            i += 1
        elif tok.startswith("-"):
            return opts, -1  # an option we do not know: run the command unchanged
        else:
            return opts, i
    return opts, -1


def _worker_argv(command: Sequence[str]) -> list[str]:
    """What torch's agent runs for each rank (in ``--no-python`` style: the command as given).

    ``python [opts] (-c CODE | -m MOD | SCRIPT) ARGS`` of this environment runs through the shim
    (``-u`` added, as torchrun does, so that output is not held back in a buffer); anything else
    runs unchanged and falls back to its stderr's last line for the failure summary.

    Raises:
        _UsageError: the program is not found on PATH.
    """
    path = _which(command[0])
    if not _is_shoals_python(path):
        return [path, *command[1:]]
    opts, i = _python_target(command)
    if i < 0:
        return [path, *command[1:]]
    return [path, *opts, "-u", "-m", _MODULE, "--worker", *command[i:]]


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise _UsageError(f"shoal: command not found: {program!r}. HINT: check PATH, or give "
                          "the full path of the program.")
    return path


def _check_program(command: Sequence[str]) -> None:
    """Refuse a command that cannot start: not on PATH, or ``python SCRIPT`` with no such script.

    Checked before any rank starts: each rank would otherwise fail alone, after the rendezvous and a
    second or more of start-up (11 s measured for ``python nosuch.py`` before this check).

    Raises:
        _UsageError: naming the program or the script.
    """
    path = _which(command[0])
    if re.fullmatch(r"python[0-9.]*", os.path.basename(path)):
        _, i = _python_target(command)
        if i > 0 and command[i] not in ("-c", "-m") and not os.path.exists(command[i]):
            raise _UsageError(f"shoal: {command[0]} can't open file {command[i]!r}: no such file in "
                              f"{os.getcwd()}. HINT: check the path; every rank starts in this directory.")


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


@dataclass(slots=True)
class _AgentResult:
    """How one agent's share of the job ended."""

    code: int  # its exit status: 0, the root-cause failure's, 128+N when interrupted by signal N
    failures: list[Failure] = field(default_factory=list)
    exited_ok: list[int] = field(default_factory=list)  # global ranks that exited 0


def _run_agent(plan: _AgentPlan, secret: str) -> _AgentResult:
    """Run this host's share of the job in torch's elastic agent, in this process.

    Args:
        plan: what to run here.
        secret: the job's secret: every key of the store lives under it (constraint 5).
    """
    from torch.distributed.elastic.multiprocessing import Std  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415

    from . import agent as _agent  # noqa: PLC0415 (imports torch)

    host = plan.host or socket.gethostname()
    _quiet_torch_agent(plan.verbose)
    # torch's tee threads write each rank's lines to our stdout; into a pipe (a remote command, a
    # CI log) Python would hold them in a block buffer until exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    _env.export_env(plan.env, "shoal run flags")
    _env.export_job_secret(secret)
    if plan.nproc > 1:
        # torchrun does the same: N ranks x all-cores OpenMP pools oversubscribe the CPU.
        _env.set_default_env("OMP_NUM_THREADS", "1", "several ranks share this host's cores")
    _check_program(plan.command)
    argv = _worker_argv(plan.command)
    log_root = plan.log_dir or tempfile.mkdtemp(prefix="shoal-run-")
    os.makedirs(log_root, exist_ok=True)
    # Before anything that can start a worker (constraint 7).
    sentinel = Sentinel.start(_MODULE, None if plan.log_dir else log_root)
    run_id = plan.run_id or secrets.token_hex(_SECRET_BYTES)
    # One host: the store on loopback, a free port (no clash between concurrent jobs). Several:
    # torch's static rendezvous at the master address; node rank = host order. (torch's dynamic c10d
    # rendezvous numbers nodes by sorting their descriptors, see dynamic_rendezvous.py
    # `enumerate(sorted(state.participants))`, so rank 0 could land on any host; -H order must decide.)
    master_addr = plan.master_addr or "127.0.0.1"
    try:
        sentinel.job(run_id, plan.node_rank)
        logs = _agent.RememberingLogsSpecs(log_dir=log_root, tee=Std.ALL)
        try:
            store, port = _agent.open_store(master_addr, plan.master_port, plan.node_rank == 0, secret,
                                            plan.start_timeout_s, remote_peers=plan.nnodes > 1)
        except ValueError as exc:  # the store cannot listen there (address, port): a usage error
            raise _UsageError(str(exc)) from None
        agent = _agent.make_agent(
            store=store, master_addr=master_addr, master_port=port, node_rank=plan.node_rank,
            nnodes=plan.nnodes, nproc=plan.nproc, run_id=run_id,
            start_timeout_s=plan.start_timeout_s, argv=argv, logs=logs,
            monitor_interval_s=_MONITOR_INTERVAL_S, shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S,
            log_line_prefix_template=_LINE_PREFIX_TEMPLATE, sentinel=sentinel)
        log.debug("shoal: agent on %s runs %s, store %s:%s", host, argv, master_addr, port)
        result = agent.run()
        ranks = _agent.global_ranks(agent)
        failures = [failure_from_torch(rank, pf, logs.stderrs.get(pf.local_rank), host)
                    for rank, pf in result.failures.items()]
        exited_ok = [r for r in ranks if r not in result.failures]
        if not failures:
            return _AgentResult(0, [], exited_ok)
        failures.sort(key=Failure.sort_key)
        return _AgentResult(exit_status(blame(failures, exited_ok).root), failures, exited_ok)
    except SignalException as exc:
        # Ctrl-C or SIGTERM: torch's agent already stopped the workers.
        return _AgentResult(128 + int(exc.sigval))
    except _UsageError:
        raise
    except Exception as exc:  # rendezvous or start-up failure: no rank to blame
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _AgentResult(EXIT_LAUNCHER, [Failure(rank=None, host=host, what=f"{type(exc).__name__}: {text}",
                                                    timestamp=time.time())])
    finally:
        # torch's agent stopped and reaped its workers before run() returned or raised.
        sentinel.done()
        # torch's agent left its handlers installed: they raise SignalException, which a second
        # SIGTERM (the coordinator's escalation) would throw into interpreter shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not plan.log_dir:
            shutil.rmtree(log_root, ignore_errors=True)


def _read_secret(timeout_s: float) -> Optional[str]:
    """The job's secret: the first line on stdin, written by the coordinator (constraint 6)."""
    buf, deadline = b"", time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([0], [], [], left)[0]:
            return None
        chunk = os.read(0, 1)  # one byte at a time: what follows the line is the stop signal's
        if not chunk:
            return None
        buf += chunk
    secret = buf.decode(errors="replace").strip()
    return secret if re.fullmatch(r"[0-9a-f]{32,}", secret) else None


_NO_SECRET = ("no job secret arrived on the agent's stdin. HINT: the --remote-command must pass stdin through to "
              "the remote command (ssh and 'ip netns exec' do; ssh -n does not)")


def _agent_secret(timeout_s: float) -> Optional[str]:
    """A remote agent's first act (static or elastic): the job's secret from stdin (None: it did not come);
    once it came, the agent stops when stdin closes (the coordinator's end of the pipe)."""
    secret = _read_secret(timeout_s)
    if secret is not None:
        threading.Thread(target=_stop_when_stdin_closes, name="shoal-stdin-watch", daemon=True).start()
    return secret


def _agent_main(token: str) -> int:
    """Entry of a remote agent: ``python -m shoal.runner.launch --agent PLAN``, secret on stdin."""
    plan = _decode_plan(token)
    secret = _agent_secret(plan.start_timeout_s)
    if secret is None:
        result = _AgentResult(EXIT_LAUNCHER, [Failure(rank=None, host=plan.host, what=_NO_SECRET,
                                                      timestamp=time.time())])
    else:
        try:
            result = _run_agent(plan, secret)
        except _UsageError as exc:  # e.g. the command is not on this host's PATH
            result = _AgentResult(EXIT_USAGE, [Failure(rank=None, host=plan.host, what=str(exc))])
    for f in result.failures:
        print(_REPORT_MARK + json.dumps({"failure": dataclasses.asdict(f)}), file=sys.stderr, flush=True)
    print(_REPORT_MARK + json.dumps({"exited_ok": result.exited_ok}), file=sys.stderr, flush=True)
    return result.code


def _elastic_agent_main(token: str) -> int:
    """Entry of an elastic job's agent on a host (:func:`shoal.runner.elastic.serve_host`), secret on stdin."""
    plan = _decode_json(token)
    secret = _agent_secret(float(plan["start_timeout_s"]))
    if secret is None:
        print(f"shoal: agent on host {plan['host']}: {_NO_SECRET}", file=sys.stderr, flush=True)
        return EXIT_LAUNCHER
    try:
        _env.export_env(plan["env"], "shoal run flags")
        _check_program(plan["command"])
        argv = _worker_argv(plan["command"])
    except _UsageError as exc:  # e.g. the command is not on this host's PATH: the coordinator shows this line
        print(f"{exc} (on host {plan['host']})", file=sys.stderr, flush=True)
        return EXIT_USAGE
    from .elastic import serve_host  # noqa: PLC0415 (imports torch)

    return serve_host(plan, argv, secret)


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
        super().__init__(signal_name(signum))
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise _Interrupted(signum)


def _pump_stderr(stream: Any, index: int, reports: "queue.Queue", exited_ok: list[int],
                 tails: list[str]) -> None:
    """Forward an agent's stderr, except its report lines: failures go to ``reports``, the ranks that
    exited 0 to ``exited_ok``."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if line.startswith(_REPORT_MARK):
            try:
                report = json.loads(line[len(_REPORT_MARK):])
                if "failure" in report:
                    reports.put((index, Failure(**report["failure"])))
                else:
                    exited_ok.extend(int(r) for r in report["exited_ok"])
                continue
            except (ValueError, TypeError, KeyError):
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


def _start_remote_agent(remote_command: str, host: str, entry: list[str], secret: str, index: int,
                       reports: "queue.Queue", exited_ok: list[int],
                       tails: list[str]) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``python -m shoal.runner.launch ENTRY...`` on ``host`` through ``remote_command`` (constraint 6):
    the job's secret is the first line on its stdin, never in an argv; its stderr is forwarded by a thread
    (:func:`_pump_stderr`: report lines go to ``reports``/``exited_ok``, the last other line to
    ``tails[index]``). Used by the static coordinator and the elastic one (:mod:`shoal.runner.elastic`).

    Returns:
        The remote command's process (in its own session: a Ctrl-C reaches only the coordinator, which
        stops agents in order) and the stderr thread.

    Raises:
        ValueError: ``host`` or ``remote_command`` is not valid (:func:`shoal.runner.hosts.remote_argv`).
    """
    argv = remote_argv(remote_command, host, [sys.executable, "-m", _MODULE, *entry])
    log.debug("shoal: host %s: %s", host, argv)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.stdin.write(secret.encode() + b"\n")
        proc.stdin.flush()
    except OSError:  # the remote command ended already: its exit status tells why
        pass
    t = threading.Thread(target=_pump_stderr, name=f"shoal-agent-{host}",
                         args=(proc.stderr, index, reports, exited_ok, tails), daemon=True)
    t.start()
    return proc, t


def _run_hosts(plans: list[_AgentPlan], remote_command: str, world_size: int, secret: str) -> int:
    """Start one agent per host through ``remote_command`` and watch them (constraint 6).

    Each agent's stdin is a pipe from here: its first line is the job's secret; its end (EOF) tells
    the agent to stop, also when this process dies without a word (SIGKILL: the kernel closes it).

    Stopping is staged so that each agent can stop its own workers (they run in their own
    sessions, out of reach of a process-group kill here): close its stdin (the agent sends itself
    SIGTERM; the only signal that crosses ssh), then SIGTERM the remote command's process group
    (for templates that do not pass stdin), then SIGKILL.
    """
    procs: list[subprocess.Popen] = []
    reports: "queue.Queue[tuple[int, Failure]]" = queue.Queue()
    exited_ok: list[int] = []
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
                proc, t = _start_remote_agent(remote_command, plan.host, ["--agent", _encode_plan(plan)], secret,
                                             i, reports, exited_ok, tails)
                procs.append(proc)
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
            print(f"shoal: interrupted ({signal_name(interrupted)}); stopping all agents",
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
    failures: list[Failure] = []
    while not reports.empty():
        _, f = reports.get()
        f.timestamp = len(failures)  # across hosts: order of arrival (host clocks differ)
        failures.append(f)
    reported = {f.host for f in failures}
    for i, (plan, proc) in enumerate(zip(plans, procs)):
        if proc.returncode != 0 and plan.host not in reported:
            code = proc.returncode
            what = f"killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
            failures.append(Failure(
                rank=None, host=plan.host, what=f"remote command {what}"
                + (f": {tails[i]}" if tails[i] else ""), exitcode=EXIT_LAUNCHER,
                timestamp=len(failures), stopped=asked_to_stop[i] and code in _STOPPED_CODES))
    if not failures:
        return 0
    return print_summary(failures, world_size, plans[0].log_dir, exited_ok)


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


def _check_inherited_knobs(knob_env: dict[str, str]) -> ShoalConfig:
    """Refuse a bad ``SHOAL_*`` value inherited from the shell before any rank starts (constraint 2);
    return the configuration the ranks will read (the launcher uses ``start_timeout_s`` of it too).

    The ranks would each fail on it at ``init()``, after the rendezvous; the same value as a flag is
    refused at once. A flag given for the knob replaces the shell's value, so it is checked instead.
    """
    try:
        return _env.read_config(environ=_env.child_environ(knob_env))
    except ValueError as exc:
        raise _UsageError(f"{exc} (inherited from this shell's environment). HINT: fix or unset the "
                          "variable, or give the knob's flag, which wins over it.") from None


def _main(args: argparse.Namespace) -> int:
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        raise _UsageError("shoal: no command to run. HINT: shoal run -np 2 python train.py")
    if args.num_proc < 1:
        raise _UsageError(f"shoal: -np must be >= 1, got {args.num_proc}.")
    knob_env = knob_environment(args)
    # One knob for the whole start: agents wait for each other this long, and so do ranks in init().
    args.start_timeout_s = _check_inherited_knobs(knob_env).start_timeout_s
    if args.hosts and args.hostfile:
        raise _UsageError("shoal: give -H or --hostfile, not both.")
    hosts = parse_hosts(args.hosts) if args.hosts else \
        parse_hostfile(args.hostfile) if args.hostfile else None
    log_dir = os.path.abspath(args.log_dir) if args.log_dir else None
    secret = secrets.token_hex(_SECRET_BYTES)  # constraint 5: 128 bits, never on a command line
    if args.elastic or args.min_np is not None or args.max_np is not None or args.host_discovery_script:
        return _main_elastic(args, program, knob_env, hosts, log_dir, secret)
    if hosts is None:
        _check_program(program)  # command or script not found -> usage error before anything starts
        plan = _AgentPlan(command=program, nproc=args.num_proc,
                          env={**knob_env, **_extra_env(args.env, remote=False)},
                          log_dir=log_dir, start_timeout_s=args.start_timeout_s, verbose=args.verbose)
        result = _run_agent(plan, secret)
        if result.failures:
            return print_summary(result.failures, args.num_proc, log_dir, result.exited_ok)
        if result.code >= 128:
            print(f"shoal: interrupted ({signal_name(result.code - 128)}); all ranks stopped",
                  file=sys.stderr, flush=True)
        return result.code
    placed = place_ranks(hosts, args.num_proc)
    check_remote_command(args.remote_command)
    master_addr = parse_address(args.master_addr) if args.master_addr else placed[0][0]
    forwarded = _forwarded_env(args, knob_env)
    run_id = secrets.token_hex(_SECRET_BYTES)  # torch's keys live under it: not guessable either
    plans = [_AgentPlan(command=program, nproc=n, host=h, nnodes=len(placed), node_rank=i,
                        master_addr=master_addr, master_port=args.master_port,
                        run_id=run_id, env=forwarded, log_dir=log_dir,
                        start_timeout_s=args.start_timeout_s, verbose=args.verbose)
             for i, (h, n) in enumerate(placed)]
    return _run_hosts(plans, args.remote_command, args.num_proc, secret)


def _main_elastic(args: argparse.Namespace, program: list[str], knob_env: dict[str, str], hosts,
                  log_dir: Optional[str], secret: str) -> int:
    """``shoal run`` in elastic mode (:mod:`shoal.runner.elastic`): on this host, or on several with ``-H`` /
    ``--hostfile`` or a host discovery script that names other hosts."""
    from .elastic import ElasticPlan, discover_hosts, local_names, run_elastic  # noqa: PLC0415

    min_np = args.min_np if args.min_np is not None else args.num_proc
    max_np = args.max_np if args.max_np is not None else max(args.num_proc, min_np)
    if not 1 <= min_np <= args.num_proc <= max_np:
        raise _UsageError(f"shoal: elastic sizes must satisfy 1 <= --min-np ({min_np}) <= -np ({args.num_proc}) "
                          f"<= --max-np ({max_np}).")
    if args.max_restarts < 0:
        raise _UsageError(f"shoal: --max-restarts must be >= 0, got {args.max_restarts}.")
    script = args.host_discovery_script
    if script is not None and not (os.path.isfile(script) and os.access(script, os.X_OK)):
        raise _UsageError(f"shoal: --host-discovery-script {script!r} is not an executable file. HINT: chmod +x "
                          "it; it must print 'host:slots' lines.")
    if script is not None and hosts is not None:
        raise _UsageError("shoal: give -H/--hostfile or --host-discovery-script, not both (as horovodrun). HINT: "
                          "the script's output is the job's host list while it runs.")
    if script is not None:
        found = discover_hosts(script)
        if any(h not in local_names() for h, _ in found):
            hosts = found  # it names other hosts: one agent per host
    _check_program(program)
    if max_np > 1 and _env.get_env("OMP_NUM_THREADS") is None:
        knob_env = {**knob_env, "OMP_NUM_THREADS": "1"}  # as torchrun: N workers x all-cores pools oversubscribe
    if hosts is None:
        env = {**knob_env, **_extra_env(args.env, remote=False)}
        plan = ElasticPlan(argv=_worker_argv(program), np=args.num_proc, min_np=min_np, max_np=max_np, env=env,
                           discovery_script=script, max_restarts=args.max_restarts, log_dir=log_dir,
                           start_timeout_s=args.start_timeout_s, module=_MODULE)
        return run_elastic(plan, secret, verbose=args.verbose)
    place_ranks(hosts, args.num_proc)  # -np fits the slots, or a usage error naming them
    check_remote_command(args.remote_command)
    for host, _ in hosts:
        remote_argv(args.remote_command, host, ["true"])  # every host name checked before anything starts
    master_addr = _coordinator_address(args.master_addr, hosts)
    plan = ElasticPlan(argv=[], np=args.num_proc, min_np=min_np, max_np=max_np, env=_forwarded_env(args, knob_env),
                       discovery_script=script, max_restarts=args.max_restarts, log_dir=log_dir,
                       start_timeout_s=args.start_timeout_s, module=_MODULE, hosts=list(hosts), command=program,
                       remote_command=args.remote_command, master_addr=master_addr, master_port=args.master_port,
                       verbose=args.verbose)
    try:
        return run_elastic(plan, secret, verbose=args.verbose)
    except ValueError as exc:  # the store cannot listen there (address, port): a usage error
        raise _UsageError(str(exc)) from None


def _forwarded_env(args: argparse.Namespace, knob_env: dict[str, str]) -> dict[str, str]:
    """What remote workers get (ssh forwards no environment): ``SHOAL_*`` of this shell, then the flags, then
    ``-x``, all explicit (constraint 6)."""
    forwarded = {env_name(f.name): v for f in knobs() if (v := _env.get_env(env_name(f.name))) is not None}
    forwarded.update(knob_env)
    forwarded.update(_extra_env(args.env, remote=True))
    return forwarded


def _coordinator_address(given: Optional[str], hosts: Sequence[tuple[str, int]]) -> str:
    """Where an elastic job's store listens: on this host (the coordinator holds it, elastic.py constraint 2),
    at ``--master-addr`` when given, else at the address this host's route to the first other host uses.

    Raises:
        _UsageError: ``--master-addr`` is not an address of this host.
    """
    if given:
        addr = parse_address(given)
        if not _is_local_address(addr):
            raise _UsageError(f"shoal: --master-addr {given} is not an address of this host "
                              f"({socket.gethostname()}): in elastic mode the launching host holds the job's "
                              "store. HINT: give one of this host's addresses that the other hosts reach, or "
                              "leave --master-addr out (then the address of this host's route to the first other "
                              "host is used).")
        return addr
    from .elastic import local_names  # noqa: PLC0415

    others = [h for h, _ in hosts if h not in local_names() and not _is_local_address(h)]
    target = others[0] if others else hosts[0][0]
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)  # a UDP "connect" sends nothing: it only picks the route and its source address
            return s.getsockname()[0]
    except OSError as exc:
        raise _UsageError(f"shoal: cannot find this host's address towards host {target!r}: {exc}. HINT: give "
                          "--master-addr as this host's address that the other hosts reach.") from None


def _is_local_address(addr: str) -> bool:
    """Whether ``addr`` resolves to an address of this host (one a socket here can bind)."""
    try:
        infos = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((sockaddr[0], 0) + tuple(sockaddr[2:]))
                return True
        except OSError:
            continue
    return False


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
        record_exception(exc)  # with Shoal's fields (culprit_ranks), for the summary
        return 1
    return 0


def _module_main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"] and len(argv) > 1:
        return _shim_main(argv[1:])
    if argv[:1] == ["--agent"] and len(argv) == 2:
        return _agent_main(argv[1])
    if argv[:1] == ["--elastic-agent"] and len(argv) == 2:
        return _elastic_agent_main(argv[1])
    if argv[:1] == ["--sentinel"] and len(argv) == 3 and argv[1].isdigit():
        return sentinel_main(int(argv[1]), argv[2])
    print("usage: python -m shoal.runner.launch (--worker COMMAND... | --agent PLAN | --elastic-agent PLAN | "
          "--sentinel PID DIR); "
          "this is shoal run's internal entry, use `shoal run` instead", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
