"""The timeline: a Chrome-trace record of what the gradient engine did, per rank and per stream.

This module owns the recorder, the file format and the merge of per-rank files; the engine
(:mod:`shoal.core.reducer`, :mod:`shoal.core.autotune`, the frontends) decides what to record and
when. The files open in Perfetto (https://ui.perfetto.dev) and ``chrome://tracing``.

Tracks (``tid`` in the file; ``pid`` is the rank):

    steps       one slice per step, boundary to boundary, and an instant marker at each boundary
    main        the training thread: waiting in ``synchronize()``, optimizer step, NaN check, negotiation
    gradients   per bucket: first gradient ready -> last gradient ready ("waiting for gradients")
    stream k    per bucket on stream k: communication, launch -> completion (completion is stamped by
                the future's callback on the backend's own thread)
    autotune    the tuner's trials and decisions (instant events)
    other       a thread of its own per name (compression / decompression on a stream's worker thread)

Design constraints:

1. Free when off. The reducer asks :func:`active` (a module global, None when off) once per step and
   then tests one attribute per recording site: once per gradient, twice per bucket. Measured here
   (``benchmarks/autotune_bench.py --micro``, 2 loaded cores): 43 ns per test, 21 microseconds per step
   for the 482-gradient benchmark model, 0.01% of its 150 ms step. On, the engine's time per step grew
   by 0.31 ms for that model (0.2%).
2. Any thread may record. Completion callbacks run on the backend's threads and compression on a
   stream's worker, so events go into a ``collections.deque`` (``append`` and ``popleft`` are atomic in
   CPython) and only the thread that writes the file drains it. No lock on the hot path.
3. One file per rank, ``<stem>.rank<r><suffix>``. Writing needs no collective, so a crashed peer cannot
   keep a rank from writing its file, and a file opens on its own. The names are predictable, so files
   are created without following links (:mod:`shoal.core.files`): a planted ``trace.rank0.json`` symlink
   is replaced, its target left alone. :func:`merge_timelines` joins
   per-rank files into one (``python -m shoal.core.timeline merge ...``).
4. One clock. Timestamps are ``time.perf_counter_ns()`` (monotonic) relative to the recorder's start;
   each file also records the wall-clock time of that start, so merged files line up on one axis
   (exactly on one host, to NTP accuracy across hosts).
5. Bounded memory. Buffered events are written out at step boundaries once more than
   ``_FLUSH_EVENTS`` have accumulated; the file is valid JSON only after :func:`stop_timeline` (or
   interpreter exit), and ``chrome://tracing`` also reads a file cut short by a crash.
6. Importing does nothing: the recorder starts in :func:`start_timeline` (called by the user, or by the
   engine when the ``timeline_filename`` knob / ``SHOAL_TIMELINE_FILENAME`` / ``SHOAL_TIMELINE`` is set).

Example::

    import shoal.torch as hvd
    hvd.init()
    hvd.start_timeline("/tmp/trace.json")      # writes /tmp/trace.rank<r>.json on every rank
    ... train a few steps ...
    hvd.stop_timeline()
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

from .files import atomic_write, open_replacing

__all__ = [
    "Timeline",
    "active",
    "start_timeline",
    "stop_timeline",
    "maybe_start_from_config",
    "span",
    "rank_path",
    "merge_timelines",
    "load_timeline",
    "CATEGORIES",
    "main",
]

log = logging.getLogger(__name__)

#: Event categories (``cat`` in the file), one per kind of work the issue asks to see.
CATEGORIES = ("step", "wait_for_gradients", "compression", "communication", "decompression", "nan_check",
              "negotiation", "optimizer", "synchronize", "autotune")

#: Fixed track ids; stream k is ``_STREAM_TID + k``; named threads get ids from ``_OTHER_TID`` up.
_TRACKS = {"steps": 0, "main": 1, "gradients": 2, "autotune": 3}
_STREAM_TID = 10
_OTHER_TID = 100
#: Events buffered before a step boundary writes them out (about 150 bytes each in the file).
_FLUSH_EVENTS = 20_000

_active: Optional["Timeline"] = None
_lock = threading.Lock()  # start/stop only, never the hot path
_atexit_registered = False


def active() -> Optional["Timeline"]:
    """The running recorder of this process, or None (the engine's one check when the timeline is off)."""
    return _active


class Timeline:
    """Records events of one rank and writes them to ``path`` as Chrome-trace JSON.

    Use :func:`start_timeline` rather than building one: the engine records into the active recorder.

    Args:
        path: the file to write (the rank suffix is already in it).
        rank: the ``pid`` of every event.
    """

    def __init__(self, path: str, rank: int = 0):
        self.path = path
        self.rank = int(rank)
        self._events: collections.deque = collections.deque()
        self._t0_ns = time.perf_counter_ns()
        self._wall0_ns = time.time_ns()
        self._tids: dict[str, int] = dict(_TRACKS)
        self._last_step_ns: Optional[int] = None
        self._count = 0  # events written so far
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # A new file renamed over the name, never open(path, "w"): the name is predictable, and in a shared
        # directory a planted link there would have its target overwritten (shoal.core.files, constraint 1).
        self._file = open_replacing(path, "w", encoding="utf-8")
        self._file.write('{"displayTimeUnit": "ms", "otherData": ' + json.dumps({
            "rank": self.rank, "start_wall_ns": self._wall0_ns, "clock": "perf_counter_ns",
            "pid_is": "rank", "writer": "shoal.core.timeline"}) + ', "traceEvents": [\n')
        self._file.write(json.dumps({"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                                     "args": {"name": f"rank {self.rank}"}}))
        self._file.write(",\n" + json.dumps({"name": "process_sort_index", "ph": "M", "pid": self.rank,
                                             "tid": 0, "args": {"sort_index": self.rank}}))
        self._closed = False

    # ------------------------------------------------------------------------------- recording
    @staticmethod
    def now_ns() -> int:
        """The recorder's clock (``time.perf_counter_ns``)."""
        return time.perf_counter_ns()

    def tid(self, track: str) -> int:
        """Track id of ``track``: ``steps``, ``main``, ``gradients``, ``autotune``, ``stream <k>``, or any
        other name (a track of its own, e.g. a worker thread's name)."""
        t = self._tids.get(track)
        if t is None:
            if track.startswith("stream "):
                t = _STREAM_TID + int(track.split()[1])
            else:
                t = _OTHER_TID + sum(1 for v in list(self._tids.values()) if v >= _OTHER_TID)
            self._tids[track] = t  # a race here can only give two names one id: cosmetic
        return t

    def complete(self, cat: str, name: str, start_ns: int, end_ns: int, track: str = "main",
                 args: Optional[dict] = None) -> None:
        """A slice from ``start_ns`` to ``end_ns`` (``now_ns()`` values) on ``track``; any thread."""
        self._events.append(("X", cat, name, start_ns, end_ns, track, args))

    def instant(self, cat: str, name: str, track: str = "main", args: Optional[dict] = None,
                at_ns: Optional[int] = None) -> None:
        """A point event on ``track`` (now, or at ``at_ns``); any thread."""
        t = time.perf_counter_ns() if at_ns is None else at_ns
        self._events.append(("i", cat, name, t, t, track, args))

    @contextlib.contextmanager
    def span(self, cat: str, name: str, track: str = "main", args: Optional[dict] = None) -> Iterator[None]:
        """Record the ``with`` block as one slice."""
        t0 = time.perf_counter_ns()
        try:
            yield
        finally:
            self._events.append(("X", cat, name, t0, time.perf_counter_ns(), track, args))

    def mark_step(self, step: int, args: Optional[dict] = None) -> None:
        """A step boundary: a marker, a slice since the previous boundary, and maybe a write-out.

        Call from the training thread (it may write the file).
        """
        now = time.perf_counter_ns()
        if self._last_step_ns is not None:
            self._events.append(("X", "step", f"step {step}", self._last_step_ns, now, "steps", args))
        self._events.append(("i", "step", f"end of step {step}", now, now, "steps", None))
        self._last_step_ns = now
        if len(self._events) > _FLUSH_EVENTS:
            self.flush()

    # ------------------------------------------------------------------------------- writing
    def _encode(self, ev: tuple) -> str:
        ph, cat, name, start, end, track, args = ev
        out: dict[str, Any] = {"name": name, "cat": cat, "ph": ph, "pid": self.rank, "tid": self.tid(track),
                               "ts": (start - self._t0_ns) / 1e3}
        if ph == "X":
            out["dur"] = max(0, end - start) / 1e3
        else:
            out["s"] = "t"
        if args:
            out["args"] = args
        return json.dumps(out)

    def flush(self) -> None:
        """Write out the buffered events (the training thread only)."""
        if self._closed:
            return
        n = len(self._events)
        if not n:
            return
        parts = []
        for _ in range(n):
            parts.append(self._encode(self._events.popleft()))
        self._file.write(",\n" + ",\n".join(parts))
        self._count += n
        self._file.flush()

    def close(self) -> None:
        """Write everything, the track names, and close the JSON; safe to call twice."""
        if self._closed:
            return
        self.flush()
        meta = []
        for track, t in sorted(self._tids.items(), key=lambda kv: kv[1]):
            meta.append({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": t, "args": {"name": track}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": self.rank, "tid": t,
                         "args": {"sort_index": t}})
        self._file.write(",\n" + ",\n".join(json.dumps(m) for m in meta) + "\n]}\n")
        self._file.close()
        self._closed = True


# ----------------------------------------------------------------------------------- control
def rank_path(path: str, rank: int) -> str:
    """``/tmp/trace.json`` -> ``/tmp/trace.rank3.json``; a ``{rank}`` in ``path`` is replaced instead."""
    if "{rank}" in path:
        return path.replace("{rank}", str(rank))
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext or '.json'}"


def _this_rank() -> int:
    from . import runtime  # noqa: PLC0415 (runtime imports nothing of ours at module level either)

    if runtime.is_initialized():
        return runtime.rank()
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def start_timeline(path: Optional[str] = None, *, rank: Optional[int] = None) -> "Timeline":
    """Start recording this rank's timeline into ``rank_path(path, rank)``.

    Args:
        path: where to write; default the ``timeline_filename`` knob (``SHOAL_TIMELINE_FILENAME``,
            ``SHOAL_TIMELINE``, ``shoal run --timeline-filename``).
        rank: the rank to put in the file name and as ``pid`` (default: this process's rank).

    Returns:
        The recorder (also what :func:`active` returns until :func:`stop_timeline`).

    Raises:
        ValueError: no path given and none configured.
        RuntimeError: a timeline is already running in this process.

    Example:
        >>> hvd.start_timeline("/tmp/trace.json")   # rank 1 writes /tmp/trace.rank1.json
    """
    global _active, _atexit_registered
    if path is None:
        from . import runtime  # noqa: PLC0415

        path = runtime.config().timeline_filename if runtime.is_initialized() else None
        if not path:
            raise ValueError("shoal: start_timeline() needs a path. HINT: start_timeline('/tmp/trace.json'), "
                             "or set SHOAL_TIMELINE_FILENAME / shoal run --timeline-filename.")
    r = _this_rank() if rank is None else int(rank)
    with _lock:
        if _active is not None:
            raise RuntimeError(f"shoal: a timeline is already being written to {_active.path} on rank {r}. "
                               "HINT: call stop_timeline() first.")
        _active = Timeline(rank_path(path, r), r)
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
    log.info("shoal: writing the timeline of rank %d to %s", r, _active.path)
    return _active


def stop_timeline() -> Optional[str]:
    """Stop recording and finish the file. Returns its path (None when no timeline was running)."""
    global _active
    with _lock:
        tl, _active = _active, None
    if tl is None:
        return None
    tl.close()
    return tl.path


def _stop_at_exit() -> None:
    try:
        stop_timeline()
    except Exception:  # noqa: BLE001 (interpreter exit: nothing to raise to)
        pass


def maybe_start_from_config(config: Any = None) -> Optional["Timeline"]:
    """Start the timeline when the ``timeline_filename`` knob is set and none runs yet; the engine calls
    this when it builds a reducer, so that ``SHOAL_TIMELINE_FILENAME`` alone is enough."""
    if _active is not None:
        return _active
    if config is None:
        from . import runtime  # noqa: PLC0415

        if not runtime.is_initialized():
            return None
        config = runtime.config()
    path = getattr(config, "timeline_filename", None)
    if not path:
        return None
    try:
        return start_timeline(path)
    except RuntimeError:  # started by another thread meanwhile
        return _active


_NULL = contextlib.nullcontext()


def span(cat: str, name: str, track: str = "main", args: Optional[dict] = None):
    """``with span("optimizer", "step"): ...``: a slice on the active timeline; a shared no-op when off."""
    tl = _active
    if tl is None:
        return _NULL
    return tl.span(cat, name, track, args)


# ----------------------------------------------------------------------------------- reading
def load_timeline(path: str) -> dict:
    """Parse one timeline file (a dict with ``traceEvents``); a file cut short by a crash is repaired."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        body = text.rstrip().rstrip(",")
        return json.loads(body + "\n]}")


def merge_timelines(paths: Sequence[str], out_path: str) -> str:
    """Join per-rank files into one (``pid`` = rank), aligned on the wall clock of their starts.

    Returns:
        ``out_path``.
    """
    docs = [load_timeline(p) for p in paths]
    if not docs:
        raise ValueError("shoal: merge_timelines() needs at least one file")
    walls = [d.get("otherData", {}).get("start_wall_ns", 0) for d in docs]
    origin = min(walls)
    events: list[dict] = []
    for d, wall in zip(docs, walls):
        shift_us = (wall - origin) / 1e3
        for ev in d.get("traceEvents", []):
            if "ts" in ev:
                ev = dict(ev, ts=ev["ts"] + shift_us)
            events.append(ev)
    with atomic_write(out_path, "w", encoding="utf-8", durable=False) as f:
        json.dump({"displayTimeUnit": "ms", "otherData": {"merged_from": list(paths), "start_wall_ns": origin},
                   "traceEvents": events}, f)
    return out_path


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``python -m shoal.core.timeline merge OUT IN...``: merge per-rank files into OUT."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "merge":
        print("usage: python -m shoal.core.timeline merge OUT.json trace.rank0.json trace.rank1.json ...",
              file=sys.stderr)
        return 2
    print(merge_timelines(args[2:], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
