"""The only reader of ``os.environ`` in Shoal.

Three things come from the environment:

1. knob overrides, ``SHOAL_<FIELD>`` for every field of :class:`~shoal.core.config.ShoalConfig`
   (any other ``SHOAL_*`` name that Shoal does not know is a typo until proven otherwise:
   :func:`warn_unknown_variables` names the closest known one);
2. the job's secret, ``SHOAL_JOB_SECRET``, which ``shoal run`` hands to its ranks so that every key
   of the job's store lives under it (:func:`job_secret`);
3. the world this process belongs to, from whatever launched it. Detection order (first match wins):

   ========================  =========================================================
   launcher                  variables
   ========================  =========================================================
   shoal run, elastic mode   SHOAL_ELASTIC=1 with MASTER_ADDR/PORT: rank and size agreed at init
   shoal run / torchrun      RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
   shoal.testing harness     SHOAL_INIT_FILE (a FileStore path) with RANK, WORLD_SIZE
   Open MPI                  OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
   MPICH, Intel MPI (PMI)    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
   SLURM (srun)              SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, with
                             SLURM_STEP_ID (a batch script's own process has no step id: it is
                             a world of one, with a warning)
   plain ``python``          nothing: a world of one
   ========================  =========================================================

Writing variables (NCCL/gloo network settings) happens in ``shoal.init`` through
:func:`set_default_env`, never at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import typing
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

from .config import ENV_PREFIX, ShoalConfig, env_name, knob_type

__all__ = [
    "WorldInfo",
    "read_config",
    "explicit_knobs",
    "TIMELINE_ALIAS",
    "JOB_SECRET",
    "job_secret",
    "export_job_secret",
    "known_variables",
    "warn_unknown_variables",
    "detect_world",
    "parse_slurm_first_node",
    "SLURM_BATCH_SOURCE",
    "get_env",
    "child_environ",
    "set_default_env",
    "export_env",
]

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _environ(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _parse(field: dataclasses.Field, raw: str):
    """Parse ``raw`` into the type of ``field``; raise ValueError naming the variable."""
    name = env_name(field.name)
    base, optional = knob_type(field)
    text = raw.strip()
    if optional and text.lower() in ("", "none"):
        return None
    try:
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except ValueError as exc:
        raise ValueError(f"shoal: cannot parse {name}={raw!r}: {exc}") from None


def read_config(environ: Optional[Mapping[str, str]] = None, **overrides) -> ShoalConfig:
    """Build the config: defaults, then ``SHOAL_*`` variables, then ``overrides``.

    Raises:
        ValueError: a variable does not parse, or a value is out of range; the message names it.
    """
    env = _environ(environ)
    values = {}
    for f in dataclasses.fields(ShoalConfig):
        raw = env.get(env_name(f.name))
        if raw is not None:
            values[f.name] = _parse(f, raw)
    if "timeline_filename" not in values and env.get(TIMELINE_ALIAS):
        values["timeline_filename"] = env[TIMELINE_ALIAS]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ShoalConfig(**values).validate()


#: Short alias of ``SHOAL_TIMELINE_FILENAME`` (Horovod users know ``HOROVOD_TIMELINE``); the long name wins.
TIMELINE_ALIAS = "SHOAL_TIMELINE"


def explicit_knobs(environ: Optional[Mapping[str, str]] = None) -> frozenset[str]:
    """Names of the knobs set in the environment (``SHOAL_<FIELD>``; ``shoal run --flag`` sets them too).

    The autotuner leaves such knobs alone: a value the user chose is never tuned away
    (docs/autotune.md lists every way a value counts as chosen).
    """
    env = _environ(environ)
    names = {f.name for f in dataclasses.fields(ShoalConfig) if env.get(env_name(f.name)) is not None}
    if env.get(TIMELINE_ALIAS):
        names.add("timeline_filename")
    return frozenset(names)


#: The job's secret: every key of the job's store lives under it (set by ``shoal run`` for its ranks).
JOB_SECRET = "SHOAL_JOB_SECRET"

#: ``SHOAL_*`` variables that are not knobs but that Shoal sets or reads itself: the timeline alias, the
#: test harness's FileStore path, the job secret, the emulated cluster's link description.
_OTHER_VARIABLES = frozenset({TIMELINE_ALIAS, "SHOAL_INIT_FILE", JOB_SECRET, "SHOAL_CLUSTER_LINK",
                              "SHOAL_ELASTIC", "SHOAL_ELASTIC_ID", "SHOAL_ELASTIC_NP", "SHOAL_ELASTIC_MIN_NP"})

#: Set by ``shoal run`` in elastic mode (``--min-np`` / ``--max-np``): this process is an elastic worker.
ELASTIC = "SHOAL_ELASTIC"



@dataclasses.dataclass(frozen=True)
class ElasticWorker:
    """What ``shoal run --min-np`` tells one elastic worker: its launcher id, the target and minimum size."""

    worker_id: str  # "-" outside an elastic launcher
    np: int
    min_np: int
    local_slot: int = -1  # the launcher's slot for it on its host (LOCAL_RANK: a device each), -1 unknown


def elastic_worker(environ: Optional[Mapping[str, str]] = None) -> ElasticWorker:
    """The elastic launcher's variables for this worker (``SHOAL_ELASTIC_ID``/``_NP``/``_MIN_NP``)."""
    env = _environ(environ)

    def number(name: str) -> int:
        raw = env.get(name, "") or "0"
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer; it is set by `shoal run --min-np`, "
                             f"unset it or launch with shoal run") from None

    slot = env.get("LOCAL_RANK", "")
    return ElasticWorker(env.get("SHOAL_ELASTIC_ID", "-") or "-", number("SHOAL_ELASTIC_NP"),
                         number("SHOAL_ELASTIC_MIN_NP"), int(slot) if slot.isdigit() else -1)


#: Unknown names already warned about in this process (init() twice warns once).
_warned_unknown: set[str] = set()


def known_variables() -> frozenset[str]:
    """Every ``SHOAL_*`` name Shoal reads or sets: one per knob, plus its own few (e.g. ``SHOAL_TIMELINE``)."""
    return frozenset(env_name(f.name) for f in dataclasses.fields(ShoalConfig)) | _OTHER_VARIABLES


def warn_unknown_variables(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Log one warning for each ``SHOAL_*`` variable Shoal does not know, with the closest known name.

    A misspelled knob (``SHOAL_NAN_CHEK=raise``) would otherwise be ignored without a word, and the
    NaN check the user asked for would stay off. Each name is warned about once per process.

    Returns:
        The unknown names found (warned about now or before), sorted.

    Example:
        >>> warn_unknown_variables({"SHOAL_NAN_CHEK": "raise"})
        shoal: SHOAL_NAN_CHEK is not a Shoal variable and is ignored; did you mean SHOAL_NAN_CHECK? ...
        ['SHOAL_NAN_CHEK']
    """
    env = _environ(environ)
    known = known_variables()
    unknown = sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)
    for name in unknown:
        if name in _warned_unknown:
            continue
        _warned_unknown.add(name)
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close else ""
        log.warning("shoal: %s is not a Shoal variable and is ignored; %sHINT: `shoal run --help` lists "
                    "every knob with its SHOAL_* variable (docs/launcher.md).", name, guess)
    return unknown


def job_secret(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The job's secret (``SHOAL_JOB_SECRET``), or None when this process was not started by ``shoal run``."""
    return _environ(environ).get(JOB_SECRET) or None


def export_job_secret(secret: str) -> None:
    """Hand ``secret`` to the processes a launcher is about to start (``SHOAL_JOB_SECRET``).

    Called by ``shoal run`` only, right before its workers start; unlike :func:`export_env`, it never
    logs the value.
    """
    os.environ[JOB_SECRET] = secret


@dataclass(frozen=True, slots=True)
class WorldInfo:
    """Where this process stands, as told by its launcher."""

    rank: int
    size: int
    local_rank: Optional[int]
    local_size: Optional[int]
    #: ``env://`` (MASTER_ADDR/PORT), ``file://PATH`` or ``None`` (world of one, or to be agreed
    #: through mpi4py by the runtime).
    init_method: Optional[str]
    master_addr: Optional[str]
    master_port: Optional[int]
    #: Which launcher was detected: torchrun, file, mpi, slurm, slurm-batch (a batch script's own
    #: process: a world of one), elastic (``shoal run`` in elastic mode), single.
    source: str


def _first_of_ranges(ranges: str, nodelist: str) -> str:
    """``"03-05,9"`` -> ``"03"``: the first value of a bracket's range list, zero padding kept."""
    first = ranges.split(",")[0].strip()
    start = first.split("-")[0].strip()
    if not start.isdigit():
        raise ValueError(f"shoal: cannot parse SLURM node list {nodelist!r}: range [{ranges}] does not "
                         "start with a number. HINT: set MASTER_ADDR to the first host of the job.")
    return start


def parse_slurm_first_node(nodelist: str) -> str:
    """First host of a SLURM node list (SLURM's hostlist syntax, as in ``SLURM_JOB_NODELIST``).

    The list is comma-separated at the top level (commas inside brackets separate ranges); each entry
    is text with any number of bracketed range lists, and the first host takes the first value of
    every bracket, zero padding included:

    =========================  ===============
    node list                  first host
    =========================  ===============
    ``gpu[03-05,9],cpu1``      ``gpu03``
    ``node[1-2]-ib``           ``node1-ib``
    ``rack[1-2]-n[01-04]``     ``rack1-n01``
    ``solo,other[1-2]``        ``solo``
    =========================  ===============

    Raises:
        ValueError: the list is empty, its brackets do not balance, or it starts with a bracket.
    """
    bad = ValueError(f"shoal: cannot parse SLURM node list {nodelist!r}. HINT: set MASTER_ADDR to the "
                     "first host of the job.")
    entry, depth = nodelist.strip(), 0
    for i, ch in enumerate(entry):
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):  # nested or stray brackets: not SLURM's syntax
            raise bad
        if ch == "," and depth == 0:
            entry = entry[:i]
            break
    if depth != 0 or not entry or entry.startswith("["):
        raise bad
    return re.sub(r"\[([^\]]*)\]", lambda m: _first_of_ranges(m.group(1), nodelist), entry)


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


#: SLURM variables set for the tasks of a job step started by ``srun``, and only for those (see
#: :func:`_is_srun_step`).
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")

#: ``source`` of the world of one that a SLURM batch script's own process gets.
SLURM_BATCH_SOURCE = "slurm-batch"


def _is_srun_step(env: Mapping[str, str]) -> bool:
    """True for a task of an ``srun`` step; False for the batch script's process (``sbatch``).

    SLURM sets SLURM_PROCID (0) and SLURM_NTASKS (the job's task count) in the batch step too, so
    they alone would make a plain ``python train.py`` in a batch script wait for ``SLURM_NTASKS``
    ranks that never come. What tells the two apart: slurmstepd exports SLURM_STEP_ID (and the old
    SLURM_STEPID) only when the step id is non-negative (``setup_env`` in SLURM's src/common/env.c:
    ``if (env->stepid >= 0)``, ``stepid`` an ``int``), and the batch step's id, SLURM_BATCH_SCRIPT =
    0xfffffffb, is negative as an ``int`` (so is the interactive step's, 0xfffffffa). srun steps are
    numbered 0, 1, 2, ...
    """
    return any(env.get(name, "") != "" for name in _SLURM_STEP_VARS)


def _slurm_batch_step(env: Mapping[str, str], quiet: bool) -> WorldInfo:
    """The batch script's process: a world of one, with a warning when the job has more tasks."""
    ntasks = env.get("SLURM_NTASKS", "")
    if not quiet and ntasks.strip() not in ("", "0", "1"):
        log.warning(
            "shoal: this process is a SLURM batch script, not an srun task (SLURM_NTASKS=%s but no "
            "SLURM_STEP_ID), so it runs as a world of one and the job's other tasks stay idle. "
            "HINT: start one rank per task with `srun python train.py` in the batch script "
            "(or `shoal run -np N python train.py` on one node).", ntasks)
    return WorldInfo(0, 1, 0, 1, None, None, None, SLURM_BATCH_SOURCE)


def detect_world(environ: Optional[Mapping[str, str]] = None, *, quiet: bool = False) -> WorldInfo:
    """Find rank and world size from the launcher's variables (see the module docstring).

    Args:
        environ: the variables (default ``os.environ``).
        quiet: do not log the warning about a SLURM batch step (``shoal doctor`` reports it itself).
    """
    env = _environ(environ)
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    if env.get(ELASTIC) == "1":
        # Rank and size are agreed in the job's store when init() joins (shoal.core.membership).
        # LOCAL_RANK: the launcher's free slot on this host (a device each); local_size comes from the layout.
        return WorldInfo(-1, _int(env, "SHOAL_ELASTIC_NP") or 0, _int(env, "LOCAL_RANK"), None, "elastic://", addr,
                         port, "elastic")
    if env.get("SHOAL_INIT_FILE"):
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), _int(env, "LOCAL_RANK"),
                         _int(env, "LOCAL_WORLD_SIZE"), "file://" + env["SHOAL_INIT_FILE"],
                         None, None, "file")
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), _int(env, "LOCAL_RANK"),
                         _int(env, "LOCAL_WORLD_SIZE"), "env://", addr, port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
        size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
        return WorldInfo(rank, size, local_rank, local_size,
                         "env://" if addr else None, addr, port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if not _is_srun_step(env):
            return _slurm_batch_step(env, quiet)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None and nodelist:
            addr = parse_slurm_first_node(nodelist)
        if port is None:
            # One port per job, so that two jobs sharing a first node do not collide.
            port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         _int(env, "SLURM_LOCALID"), None, "env://", addr, port, "slurm")
    return WorldInfo(0, 1, 0, 1, None, None, None, "single")


def get_env(name: str, default: Optional[str] = None,
            environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Read one variable (for the few non-knob variables Shoal looks at, e.g. ``NCCL_*``)."""
    return _environ(environ).get(name, default)


def child_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a child started now would see: this process's, with ``extra`` on top.

    ``shoal run`` checks the knobs its ranks will read in it, before starting them.
    """
    return {**os.environ, **extra}


def set_default_env(name: str, value: str, reason: str) -> bool:
    """Set ``name`` unless the user already did; log either way. Returns True when set.

    Called from ``shoal.init`` only (never at import), so a user's own setting always wins and is
    never overridden silently.
    """
    current = os.environ.get(name)
    if current is not None:
        if current != value:
            log.info("shoal: keeping your %s=%s (shoal would pick %s: %s)", name, current, value, reason)
        return False
    os.environ[name] = value
    log.info("shoal: set %s=%s (%s)", name, value, reason)
    return True


@contextlib.contextmanager
def exported(values: Mapping[str, str], secret: Optional[str] = None) -> Iterator[None]:
    """Set ``values`` (and the job's secret) for the processes started inside the block; put every
    variable back as it was on leaving it. For :func:`shoal.run`, which starts its workers from the
    user's own process (``shoal run`` exports for good: its process ends with the job)."""
    names = list(values) + ([JOB_SECRET] if secret is not None else [])
    saved = {name: os.environ.get(name) for name in names}
    try:
        os.environ.update(values)
        if secret is not None:
            os.environ[JOB_SECRET] = secret
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def export_env(values: Mapping[str, str], reason: str) -> None:
    """Set variables for the processes a launcher is about to start, overriding inherited ones.

    Called by ``shoal run`` only, right before it starts its workers (never at import): a flag the
    user typed (``--no-autotune``) must beat a value inherited from the shell.
    """
    for name, value in values.items():
        previous = os.environ.get(name)
        if previous is not None and previous != value:
            log.info("shoal: %s=%s replaces the inherited %s (%s)", name, value, previous, reason)
        os.environ[name] = value
