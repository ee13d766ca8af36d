"""Chunked, staged execution of one bucket's reduction: the machinery under the compressed and
hierarchical algorithms.

A multi-stage algorithm (reduce-scatter, then allreduce of the shard, then allgather; casts between them)
cannot be expressed as one torch ``Work``, and each stage needs the previous one's result. This module
runs such algorithms: a bucket is cut into chunks, each chunk flows through the stages, and different
chunks are in different stages at once, so the cast of chunk k+1 and the node-local stages overlap with
chunk k on the slow wire.

Design constraints:

1. Same collective order on every rank. torch.distributed matches a group's collectives by the order in
   which they are issued (and point-to-point messages of one pair and tag by posting order). So every
   operation of a stream is issued by one thread, the stream's worker, in an order fixed by the schedule
   and never by completion timing: step ``t`` starts chunk ``t`` (stage 0) and runs stage ``s`` >= 1 on
   chunk ``t - s - lead``, and a stage waits only for its own chunk's previous stage. (Callbacks on the
   backend's threads would issue the next operation in completion order, which differs across ranks;
   gloo's point-to-point works have no future to call back anyway, and report ``is_completed()`` only
   once waited for, so the schedule cannot be driven by polling either.)
2. One worker per stream, shared by every algorithm that uses that stream's groups (two optimizers on
   the same process set share the stream groups): jobs of a worker run one after another, in
   submission order, which is the reducer's launch order (same on every rank).
3. Chunks, because one big message is slow here: over the emulated 1 Gbit/s link, 25 MB sent each way
   as one ``isend``/``irecv`` took 389 ms, the same bytes as 8 chunks 210 ms (the wire limit is 209 ms);
   ``all_to_all_single`` of 50 MB: 412 ms in one piece, 228 ms as 16 chunks on 2 groups.
4. Nothing runs at import and nothing polls: a worker thread starts on the first job of its stream
   and sleeps on its queue when idle (an idle rank costs nothing). Workers stop, and are joined, when
   their stream's group is garbage-collected and at interpreter exit: a daemon thread still alive when
   the interpreter finalizes aborted the process here ("terminate called without an active exception",
   SIGABRT, seen at the end of every benchmark run before this rule).
5. A failed job fails every later job of the same worker at once (with the first error), instead of
   each waiting for its own process-group timeout: after a peer failed, the groups are unusable.
6. Scratch memory is per worker and per chunk slot (a ring of as many slots as chunks in flight), not
   per bucket: allocating a fresh 100 MB buffer per step cost ~100 ms here.

What lives elsewhere: the stages themselves (:mod:`._levels`), choosing an
algorithm (:func:`shoal.core.algorithms.get_algorithm`).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["Worker", "worker_for", "run_stages", "chunk_bounds"]

_STOP = object()

# weakref to the anchor group -> worker; see constraint 4.
_workers: "weakref.WeakKeyDictionary[Any, Worker]" = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()
_atexit_registered = False


class Worker:
    """One thread that runs the jobs of one stream, in submission order (constraints 1, 2, 5)."""

    def __init__(self, name: str):
        self.name = name
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._failure: Optional[BaseException] = None
        self._scratch: dict[tuple, torch.Tensor] = {}

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future:
        """Queue ``job``; the future completes with its return value or its exception."""
        fut: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first job, or after stop()
                _register_atexit()
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((job, fut))
        return fut

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the thread finish its queued jobs and exit; wait up to ``timeout_s`` for it (constraint 4)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(_STOP)
        if thread is not threading.current_thread():
            thread.join(timeout_s)

    def scratch(self, key: Any, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A persistent buffer of at least ``numel`` elements for ``key`` (constraint 6); only the
        worker's own thread may use it."""
        k = (key, dtype, device)
        buf = self._scratch.get(k)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[k] = buf
        return buf[:numel]

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, fut = item
            if self._failure is not None:
                fut.set_exception(RuntimeError(
                    f"an earlier bucket on this stream failed: {self._failure}"))
                continue
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting caller)
                self._failure = exc
                fut.set_exception(exc)
            else:
                fut.set_result(result)


def _register_atexit() -> None:
    global _atexit_registered
    with _workers_lock:
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True


def _stop_all() -> None:
    with _workers_lock:
        workers = list(_workers.values())
    for w in workers:
        w.stop(timeout_s=5.0)


def worker_for(anchor: Any) -> Worker:
    """The worker of the stream whose process group is ``anchor`` (created on first use)."""
    with _workers_lock:
        w = _workers.get(anchor)
        if w is None:
            w = Worker(f"shoal-stream-{len(_workers)}")
            _workers[anchor] = w
            weakref.finalize(anchor, w.stop)
        return w


def chunk_bounds(numel: int, chunk_numel: int, multiple: int, ramp: bool = False) -> list[tuple[int, int]]:
    """Split ``[0, numel)`` into chunks of ``chunk_numel`` elements (rounded down to a multiple of
    ``multiple``, at least ``multiple``); only the last chunk may end off a multiple.

    ``ramp``: when the range holds at least 4 chunks, the first two and the last two are 1/4 and 1/2 of
    a chunk, so that a pipeline fills and drains faster (its first stages start on a small chunk, its last
    stages end on one).

    Example:
        >>> chunk_bounds(10, 4, 2)
        [(0, 4), (4, 8), (8, 10)]
        >>> chunk_bounds(40, 8, 2, ramp=True)
        [(0, 2), (2, 6), (6, 14), (14, 22), (22, 30), (30, 34), (34, 38), (38, 40)]
    """
    step = max(multiple, chunk_numel // multiple * multiple)
    if not ramp or numel < 4 * step:
        return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)] or [(0, 0)]
    quarter = max(multiple, step // 4 // multiple * multiple)
    half = max(multiple, step // 2 // multiple * multiple)
    body = numel - 2 * (quarter + half)
    rest = body % step
    aligned = rest // multiple * multiple
    sizes = [quarter, half] + [step] * (body // step) + ([aligned] if aligned else []) + \
        [half, quarter + rest - aligned]
    bounds, lo = [], 0
    for size in sizes:
        bounds.append((lo, lo + size))
        lo += size
    return bounds


#: A stage: ``stage(chunk_index) -> waitable or None``. It may use what the chunk's previous stage
#: produced (that stage's waitable has completed), does its CPU work, and issues at most one collective.
Stage = Callable[[int], Any]


def run_stages(stages: Sequence[Stage], nchunks: int, lead: int = 0) -> None:
    """Run every stage on every chunk with the fixed schedule of constraint 1.

    Args:
        stages: ``stage(k)`` for chunk k; the last one must issue nothing (it completes the chunk).
        nchunks: number of chunks.
        lead: how many chunks stage 0 runs ahead of the others (their first operations are on the wire
            before the worker waits for anything).

    Chunk ``k`` starts at step ``k`` and completes at step ``k + lead + len(stages) - 1``; so at most
    ``len(stages) + lead`` chunks are in flight, and a stage may keep per-chunk scratch in slot
    ``k % (len(stages) + lead)``.
    """
    nstages = len(stages)
    pending: list[list[Any]] = [[None] * nchunks for _ in range(nstages)]
    for t in range(nchunks + nstages - 1 + lead):
        for s in range(nstages):
            k = t if s == 0 else t - s - lead
            if not 0 <= k < nchunks:
                continue
            if s > 0 and pending[s - 1][k] is not None:
                pending[s - 1][k].wait()
                pending[s - 1][k] = None
            pending[s][k] = stages[s](k)
            if s == nstages - 1 and pending[s][k] is not None:
                raise AssertionError("run_stages: the last stage must not issue a collective")
