"""Online tuning of the gradient engine's bucket size and stream count ("adaptive fusion"), and of whether
the optimizer steps bucket by bucket while later buckets are on the wire (``overlap_step``).

This module owns the search: which (bucket size, stream count, overlapped step) settings to try during the
first steps,
how they are scored, when the search settles and when it starts again. Applying a setting is the
reducer's job (:meth:`shoal.core.reducer.GradientReducer.reconfigure`); calling :meth:`Autotuner.end_step`
once per step, after the reduction, is the step owner's (:class:`shoal.core.step.StepOwner`).
docs/autotune.md explains the choices with the measurements behind them.

Design constraints:

1. Score what the job waits for: the time from one step boundary (the end of a synchronization) to the
   next, i.e. forward + backward + exposed communication + optimizer step. Communication time alone
   would favour settings that finish the wire early but start it late.
2. Every rank takes the same decision with no extra round: each trial's step times go through one
   ``all_reduce(MAX)`` (the job runs at the pace of its slowest rank), and every decision is a
   deterministic function of these reduced numbers, so all ranks reconfigure at the same step.
3. Bounded: the search is coordinate descent over a small grid (bucket sizes at the current stream
   count, then stream counts at the best size), then a run-off of the best few with more samples; its
   worst case is computed up front and fits in :data:`MAX_TUNING_STEPS` steps (50).
4. Noise-tolerant on a shared machine: the first step after a change is not scored (new buffers fault
   their pages in, ~10-30 ms for 100 MB here), a trial's score is the mean of its faster half of
   steps (contention from other processes only ever adds time: on the shared 2-core machine two runs of
   the same setting differed by up to 30% in median, far less in their fastest steps), and the run-off
   re-measures the leaders later in time, so a burst of load that hit one trial does not decide alone.
   The configured setting always takes part in the run-off (with the best others): it is measured first,
   in the job's first steps, and a machine whose speed drifts during the search (a loopback run kept
   1 MB x 2 streams with the overlapped step, 1.23x DDP, over the configured 25 MB x 2, whose only
   samples were its first two steps) must not rule it out on those alone.
5. Numerics never change: a new plan moves the current values into the new buffers and sums the same
   numbers (bitwise the same result with 2 ranks; with more, a ring may add in another order, the
   rounding-level difference any bucket size change brings).
6. A value the user chose is kept: a knob set by environment variable, ``shoal run`` flag, ``init()``
   keyword (one that differs from the default) or optimizer keyword is not tuned; ``autotune=False``
   turns the tuner off.
7. Cheap once settled: one 8-byte ``all_reduce`` every :data:`DRIFT_WINDOW_STEPS` steps watches for
   drift; step times above the settled median by :data:`DRIFT_RATIO` for :data:`DRIFT_WINDOWS` windows
   in a row start a new search (at most once per :data:`RETUNE_COOLDOWN_STEPS` steps).
8. Stream counts are tuned only when the process set is the whole world: creating a process group is
   collective over the world, and ranks outside the set do not take part in this optimizer's steps.
   The groups for every count tried are created once, when the tuner is built.
9. The overlapped step is a choice measured like the others, not a fixed default, because which way it
   goes depends on where the time is. Where the wire is the bottleneck (1 Gbit/s, momentum SGD or Adam:
   a 30-70 ms optimizer step over mlp_big's 26 M parameters) the step of the buckets that landed runs
   while the CPU would otherwise wait for the last ones; where the CPU is the bottleneck (loopback, ranks
   sharing cores) the same step competes with gloo's threads and was measured slower (docs/engine.md).
   It is tried right after the sizes, at the best size, and before the stream counts: the stream count
   that suits it differs (one stream sends the big late bucket first, so that a smaller one lands last
   and less of the step is left after the wire). It changes no collective and no value (bitwise one step
   at the end, :mod:`shoal.torch.overlap`), so it needs no agreement beyond constraint 2. The frontend
   offers it (a switch, ``overlap=``) only where it is exact and the user did not set ``overlap_step``.

What lives elsewhere: bucket plans (:mod:`shoal.core.buckets`), moving values between plans
(:mod:`shoal.core.reducer`), the timeline that shows each trial (:mod:`shoal.core.timeline`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from . import env as _env
from . import runtime
from . import timeline as _timeline
from .buckets import plan_buckets
from .config import ShoalConfig

__all__ = [
    "Autotuner",
    "Setting",
    "Trial",
    "make_autotuner",
    "fixed_by_user",
    "BUCKET_SIZES_MB",
    "STREAM_COUNTS",
    "MAX_TUNING_STEPS",
    "DRIFT_WINDOW_STEPS",
    "DRIFT_RATIO",
    "DRIFT_WINDOWS",
    "RETUNE_COOLDOWN_STEPS",
]

log = logging.getLogger(__name__)

_MB = 1024 * 1024

#: Bucket sizes tried (plus the configured one). Below 1 MB a gloo allreduce is latency-bound (a 256 KB
#: bucket moved at a third of the loopback bandwidth here); 64 MB is above any single bucket worth
#: overlapping for the benchmark models (105 MB of gradients at most). Sizes that give the same plan for
#: the model at hand (same tensors in the same buckets) are tried once.
BUCKET_SIZES_MB: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
#: Stream counts tried. gloo runs each group's collectives on its own thread; past 4 on a 2-core
#: machine more threads only contend (docs/autotune.md). A count above the number of buckets is the
#: same as that number and is not tried.
STREAM_COUNTS: tuple[int, ...] = (1, 2, 3, 4)
#: The search settles within this many steps, counting from the first step of the optimizer.
MAX_TUNING_STEPS = 50
#: Steps per drift window once settled.
DRIFT_WINDOW_STEPS = 20
#: A window whose median step time exceeds the settled one by this factor counts as drifted.
DRIFT_RATIO = 1.2
#: Drifted windows in a row that start a new search.
DRIFT_WINDOWS = 3
#: Steps after settling before a new search may start (a search costs up to 50 steps at mixed speed).
RETUNE_COOLDOWN_STEPS = 500

#: Steps not scored after each change (constraint 4), scored steps per trial, leaders in the run-off and
#: scored steps each gets there. Worst case with the defaults: 8 sizes x 3 + 3 stream counts x 3 +
#: 3 x 4 + the discovery step + the final change = 47 steps; 50 with the overlapped step's trial (3).
_WARMUP_STEPS = 1
_TRIAL_STEPS = 2
_RUNOFF = 3
_RUNOFF_STEPS = 3


@dataclass(frozen=True, slots=True)
class Setting:
    """One point of the search space."""

    bucket_mb: float
    num_streams: int
    #: The optimizer steps each bucket's parameters as soon as the bucket is reduced (constraint 9).
    overlap: bool = False

    def label(self) -> str:
        return (f"{self.bucket_mb:g} MB x {self.num_streams} stream{'s' if self.num_streams != 1 else ''}"
                + (", overlapped step" if self.overlap else ""))


@dataclass(slots=True)
class Trial:
    """The scored step times of one setting (seconds; per step, the slowest rank's time)."""

    setting: Setting
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s) if self.samples_s else float("inf")

    @property
    def score_s(self) -> float:
        """What the search minimizes: the mean of the faster half of the steps (constraint 4)."""
        if not self.samples_s:
            return float("inf")
        fast = sorted(self.samples_s)[:(len(self.samples_s) + 1) // 2]
        return sum(fast) / len(fast)


class Autotuner:
    """Tunes one reducer's bucket size and stream count from measured step times.

    Build it with :func:`make_autotuner` (which honours user-fixed knobs), then call :meth:`end_step` on
    every rank once per step, after the reduction finished and before the next backward pass.

    Args:
        reducer: the :class:`~shoal.core.reducer.GradientReducer` to tune (its plan follows the agreed
            ready order already).
        tune_bucket / tune_streams: which dimensions are free.
        overlap: the frontend's switch of the overlapped step (called with True/False between steps, on
            every rank alike), offered where the overlapped step is exact and not set by the user; None:
            not tuned (constraint 9).
        overlap_initial: whether the overlapped step is on when the tuner starts.
        sizes_mb / streams: the grid (defaults :data:`BUCKET_SIZES_MB`, :data:`STREAM_COUNTS`).
        max_steps: the settle bound (default :data:`MAX_TUNING_STEPS`); the size grid is trimmed to fit.
        warmup_steps / trial_steps / runoff / runoff_steps: the schedule (constraint 4).
        drift_window_steps / drift_ratio / drift_windows / retune_cooldown_steps: re-tuning (constraint 7).
        clock: seconds, monotonic (tests may pass a fake one).

    Example (what the step owner does, shoal.core.step)::

        tuner = make_autotuner(reducer, fixed={"num_streams"})   # None when off or nothing is free
        ... every step, after reducer.finish():
        if tuner is not None and tuner.end_step():
            repoint_gradients_at(reducer.views)
    """

    def __init__(self, reducer, *, tune_bucket: bool = True, tune_streams: bool = True,
                 sizes_mb: Sequence[float] = BUCKET_SIZES_MB, streams: Sequence[int] = STREAM_COUNTS,
                 max_steps: int = MAX_TUNING_STEPS, warmup_steps: int = _WARMUP_STEPS,
                 trial_steps: int = _TRIAL_STEPS, runoff: int = _RUNOFF, runoff_steps: int = _RUNOFF_STEPS,
                 drift_window_steps: int = DRIFT_WINDOW_STEPS, drift_ratio: float = DRIFT_RATIO,
                 drift_windows: int = DRIFT_WINDOWS, retune_cooldown_steps: int = RETUNE_COOLDOWN_STEPS,
                 clock: Callable[[], float] = time.perf_counter, steps: Optional[Callable[[], int]] = None,
                 overlap: Optional[Callable[[bool], None]] = None, overlap_initial: bool = False):
        self.reducer = reducer
        self._set_overlap = overlap
        self.tune_overlap = overlap is not None
        self._own_step = 0
        self._steps = steps
        self.tune_bucket = bool(tune_bucket)
        self.tune_streams = bool(tune_streams)
        self.streams = sorted({int(s) for s in streams} | {reducer.num_streams}) if tune_streams \
            else [reducer.num_streams]
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.trial_steps = int(trial_steps)
        self.runoff = int(runoff)
        self.runoff_steps = int(runoff_steps)
        self.drift_window_steps = int(drift_window_steps)
        self.drift_ratio = float(drift_ratio)
        self.drift_windows = int(drift_windows)
        self.retune_cooldown_steps = int(retune_cooldown_steps)
        self._clock = clock
        self.initial = Setting(reducer.bucket_nbytes / _MB, reducer.num_streams, bool(overlap_initial))
        if overlap is not None:  # the frontend's switch starts where the search does (a new world's tuner too)
            overlap(self.initial.overlap)
        self.sizes_mb = self._fit_sizes(sorted({float(s) for s in sizes_mb} | {self.initial.bucket_mb})
                                        if tune_bucket else [self.initial.bucket_mb])
        #: "tuning" or "settled".
        self.state = "tuning"
        #: The setting in force.
        self.current = self.initial
        #: The chosen setting, once settled.
        self.choice: Optional[Setting] = None
        #: Step at which the last search settled (the final change was applied then).
        self.settled_at: Optional[int] = None
        #: Searches started (1 + re-tunes).
        self.searches = 0
        self.trials: dict[Setting, Trial] = {}
        self.history: list[dict] = []
        # The process set's first rank logs the decisions (every rank takes them).
        self._speaks = not runtime.is_initialized() or runtime.rank() == reducer.process_set.ranks[0]
        self._last_t: Optional[float] = None
        self._queue: list[tuple[Setting, int]] = []
        self._phase = ""
        self._measuring: Optional[Setting] = None
        self._warm_left = 0
        self._want = 0
        self._samples: list[float] = []
        self._window: list[float] = []
        self._reference_s: Optional[float] = None
        self._strikes = 0
        self._skip_next = 0
        self._views_changed = False
        self._start_search()

    # ------------------------------------------------------------------------------------- public
    @property
    def step(self) -> int:
        """Completed steps: the step owner's count when the tuner runs under one (``steps=``), else the
        calls of :meth:`end_step`."""
        return self._steps() if self._steps is not None else self._own_step

    def end_step(self) -> bool:
        """Account for the step that just ended; maybe move to another setting.

        Call on every rank of the process set, once per step, after the reduction and before the next
        backward pass (it may run one tiny collective).

        Returns:
            True when the bucket plan changed: the frontend must re-point its gradients at
            ``reducer.views`` (values were moved already).
        """
        now = self._clock()
        dt = None if self._last_t is None else now - self._last_t
        self._last_t = now
        self._own_step += 1
        if self.state == "settled":
            if dt is not None:
                self._watch_drift(dt)
            return self._changed_and_clear()
        if dt is not None and self._measuring is not None:
            if self._warm_left > 0:
                self._warm_left -= 1
            else:
                self._samples.append(dt)
        if self._measuring is not None and len(self._samples) >= self._want:
            self._score()
            self._next()
        return self._changed_and_clear()

    def summary(self) -> dict:
        """What the tuner did, for logs and benchmarks (the same on every rank)."""
        return {
            "state": self.state, "step": self.step, "settled_at": self.settled_at, "searches": self.searches,
            "tune_bucket": self.tune_bucket, "tune_streams": self.tune_streams, "tune_overlap": self.tune_overlap,
            "initial": self.initial.label(), "choice": self.choice.label() if self.choice else None,
            "choice_bucket_mb": self.choice.bucket_mb if self.choice else None,
            "choice_num_streams": self.choice.num_streams if self.choice else None,
            "choice_overlap_step": self.choice.overlap if self.choice else None,
            "trials": [{"setting": t.setting.label(), "bucket_mb": t.setting.bucket_mb,
                        "num_streams": t.setting.num_streams, "overlap_step": t.setting.overlap,
                        "median_ms": round(t.median_s * 1e3, 3),
                        "score_ms": round(t.score_s * 1e3, 3),
                        "samples": len(t.samples_s)} for t in self.trials.values()],
            "history": list(self.history),
        }

    # ------------------------------------------------------------------------------------- search
    def _worst_case_steps(self, n_sizes: int) -> int:
        per = self.warmup_steps + self.trial_steps
        flips = 1 if self.tune_overlap else 0
        runoff = min(self.runoff, n_sizes + flips + len(self.streams) - 1) if self.runoff > 1 else 0
        return (1 + n_sizes * per + flips * per + (len(self.streams) - 1) * per
                + runoff * (self.warmup_steps + self.runoff_steps) + 1)

    def _fit_sizes(self, sizes: list[float]) -> list[float]:
        """Drop the sizes farthest (in log scale) from the configured one until the worst case fits."""
        sizes = self._distinct_sizes(sizes)
        while len(sizes) > 1 and self._worst_case_steps(len(sizes)) > self.max_steps:
            far = max(sizes, key=lambda s: (abs(math.log2(s / self.initial.bucket_mb)), s))
            sizes.remove(far)
        return sizes

    def _signature(self, bucket_mb: float) -> tuple:
        red = self.reducer
        plans = plan_buckets(red.specs, red.order, bucket_nbytes=int(bucket_mb * _MB),
                             first_bucket_nbytes=red.first_bucket_nbytes,
                             groups=red.groups)
        return tuple(p.tensor_ids for p in plans)

    def _distinct_sizes(self, sizes: list[float]) -> list[float]:
        """One size per distinct plan; the configured size represents its plan (it needs no change)."""
        seen: dict[tuple, float] = {self._signature(self.initial.bucket_mb): self.initial.bucket_mb}
        for s in sizes:
            seen.setdefault(self._signature(s), s)
        return sorted(seen.values())

    def _num_buckets(self, bucket_mb: float) -> int:
        return len(self._signature(bucket_mb))

    def _start_search(self) -> None:
        self.searches += 1
        self.state = "tuning"
        self.trials = {}
        self._phase = "sizes"
        first = self.current
        sizes = [first.bucket_mb] + [s for s in self.sizes_mb if s != first.bucket_mb]
        self._queue = [(Setting(s, first.num_streams, first.overlap), self.trial_steps) for s in sizes]
        self._record("search", f"search {self.searches}: {len(sizes)} bucket sizes at "
                               f"{first.num_streams} stream(s), "
                               + ("then the overlapped step on and off, " if self.tune_overlap else "")
                               + "then stream counts")
        self._next()

    def _next(self) -> None:
        """Start the next trial of this phase, or the next phase, or settle."""
        while not self._queue:
            if self._phase == "sizes" and self.tune_overlap:
                self._phase = "overlap"
                best = self._best()
                flipped = Setting(best.bucket_mb, best.num_streams, not best.overlap)
                if flipped not in self.trials:
                    self._queue = [(flipped, self.trial_steps)]
            elif self._phase in ("sizes", "overlap"):
                self._phase = "streams"
                best = self._best()
                # More streams than buckets is the same as one stream per bucket: not tried twice.
                limit = self._num_buckets(best.bucket_mb)
                done = {min(t.num_streams, limit) for t in self.trials
                        if t.bucket_mb == best.bucket_mb and t.overlap == best.overlap}
                counts = sorted({min(s, limit) for s in self.streams} - done)
                self._queue = [(Setting(best.bucket_mb, s, best.overlap), self.trial_steps) for s in counts]
            elif self._phase == "streams":
                self._phase = "runoff"
                leaders = sorted(self.trials.values(), key=lambda t: t.score_s)[:self.runoff]
                configured = self.trials.get(self.initial)
                if configured is not None and configured not in leaders and self.runoff > 1:
                    leaders = leaders[:self.runoff - 1] + [configured]  # constraint 4
                if len(leaders) > 1:
                    self._queue = [(t.setting, self.runoff_steps) for t in leaders]
            else:
                self._settle()
                return
        setting, want = self._queue.pop(0)
        self._measuring, self._want, self._samples = setting, want, []
        self._warm_left = self.warmup_steps
        self._apply(setting, why=f"{self._phase}: try")

    def _score(self) -> None:
        """Constraint 2: the slowest rank's time per scored step, identical on every rank."""
        setting = self._measuring
        t = torch.tensor(self._samples, dtype=torch.float64, device=self._device())
        if self.reducer.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.reducer.process_set.group)
        trial = self.trials.setdefault(setting, Trial(setting))
        trial.samples_s.extend(float(v) for v in t.cpu())
        self._measuring = None
        self._record("trial", f"{setting.label()}: score {trial.score_s * 1e3:.1f} ms, median "
                              f"{trial.median_s * 1e3:.1f} ms ({len(trial.samples_s)} steps)",
                     score_ms=round(trial.score_s * 1e3, 3), median_ms=round(trial.median_s * 1e3, 3),
                     bucket_mb=setting.bucket_mb,
                     num_streams=setting.num_streams, overlap_step=setting.overlap)

    def _best(self) -> Setting:
        # Ties (equal scores) go to the earlier trial: the configured setting comes first.
        return min(self.trials.values(), key=lambda t: t.score_s).setting

    def _settle(self) -> None:
        best = self._best()
        self.choice = best
        self._apply(best, why="settle")
        self.state = "settled"
        self.settled_at = self.step
        self._window, self._reference_s, self._strikes = [], None, 0
        self._skip_next = self.warmup_steps
        base = self.trials.get(self.initial)
        msg = (f"shoal: autotune settled at step {self.step}: {best.label()} "
               f"(step {self.trials[best].score_s * 1e3:.1f} ms over {len(self.trials)} settings"
               + (f"; configured {self.initial.label()}: {base.score_s * 1e3:.1f} ms" if base else "") + ")")
        self._record("settle", msg, score_ms=round(self.trials[best].score_s * 1e3, 3))
        if self._speaks:
            log.info(msg)

    # ------------------------------------------------------------------------------------- drift
    def _watch_drift(self, dt: float) -> None:
        if self._skip_next > 0:
            self._skip_next -= 1
            return
        self._window.append(dt)
        if len(self._window) < self.drift_window_steps:
            return
        t = torch.tensor([statistics.median(self._window)], dtype=torch.float64, device=self._device())
        self._window = []
        if self.reducer.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.reducer.process_set.group)
        median = float(t.item())
        if self._reference_s is None:
            # The first full window after settling, not the search's samples: those were taken among
            # other settings' transitions and at another time.
            self._reference_s = median
            return
        self._strikes = self._strikes + 1 if median > self.drift_ratio * self._reference_s else 0
        if self._strikes >= self.drift_windows and self.step - (self.settled_at or 0) >= self.retune_cooldown_steps:
            msg = (f"shoal: step time drifted to {median * 1e3:.1f} ms from {self._reference_s * 1e3:.1f} ms "
                   f"for {self._strikes} windows of {self.drift_window_steps} steps: tuning again")
            if self._speaks:
                log.info(msg)
            self._record("drift", msg)
            self._start_search()

    # ------------------------------------------------------------------------------------- helpers
    def _apply(self, setting: Setting, why: str) -> None:
        if (setting.bucket_mb, setting.num_streams) != (self.current.bucket_mb, self.current.num_streams):
            changed = self.reducer.reconfigure(bucket_nbytes=int(setting.bucket_mb * _MB),
                                               num_streams=setting.num_streams)
            self._views_changed = self._views_changed or changed
        if setting.overlap != self.current.overlap and self._set_overlap is not None:
            self._set_overlap(setting.overlap)
        self.current = setting
        self._record("apply", f"{why} {setting.label()}", bucket_mb=setting.bucket_mb,
                     num_streams=setting.num_streams, overlap_step=setting.overlap)

    def _changed_and_clear(self) -> bool:
        changed, self._views_changed = self._views_changed, False
        return changed

    def _record(self, kind: str, text: str, **extra) -> None:
        self.history.append({"step": self.step, "kind": kind, "text": text, **extra})
        if len(self.history) > 1000:
            del self.history[:500]
        tl = _timeline.active()
        if tl is not None:
            tl.instant("autotune", text, "autotune", {"step": self.step, **extra})
        log.debug("shoal: autotune step %d: %s", self.step, text)

    def _device(self) -> torch.device:
        return self.reducer.buffers[0].device if self.reducer.buffers else torch.device("cpu")


def fixed_by_user(config: ShoalConfig, options: Iterable[str]) -> frozenset[str]:
    """Constraint 6: the knobs the tuner leaves alone, because the user set them: by environment / flag,
    by ``init()`` keyword (differs from the default), or by the optimizer's keyword arguments ``options``.
    Frontends use it to tell ranks' settings apart from what the tuner would change."""
    default = ShoalConfig()
    names = set(_env.explicit_knobs()) | {k for k in options}
    for name in ("fusion_threshold_mb", "num_streams", "overlap_step"):
        if getattr(config, name) != getattr(default, name):
            names.add(name)
    return frozenset(names)


def make_autotuner(reducer, fixed: Iterable[str] = (), overlap: Optional[Callable[[bool], None]] = None,
                   **kwargs) -> Optional[Autotuner]:
    """The tuner for ``reducer``, or None when tuning is off or nothing is left to tune.

    Call on every rank of the reducer's process set at the same point (it may create process groups).

    Args:
        reducer: a built :class:`~shoal.core.reducer.GradientReducer` (after its first re-plan).
        fixed: the engine keywords the frontend got from the user (e.g. ``fusion_threshold_mb``): those
            are fixed.
        overlap: the frontend's switch of the overlapped step, where it offers one (constraint 9); left
            alone when the user set ``overlap_step`` (environment, flag or ``init()``).
        **kwargs: passed to :class:`Autotuner` (schedule and grid, for tests and benchmarks).

    Returns:
        An :class:`Autotuner`, or None: ``autotune`` is off, the process set has one rank, or the
        bucket size, the stream count and the overlapped step are all fixed (by the user, or by
        ``groups=``, or a process set that is not the world for the stream count, or no switch).
    """
    cfg = runtime.config()
    if not cfg.autotune or reducer.world < 2:
        return None
    fixed = fixed_by_user(cfg, fixed)
    tune_bucket = "fusion_threshold_mb" not in fixed and reducer.groups is None
    whole_world = reducer.process_set.ranks == tuple(range(runtime.size()))
    tune_streams = "num_streams" not in fixed and whole_world
    if "overlap_step" in fixed:
        overlap = None
    if not tune_bucket and not tune_streams and overlap is None:
        return None
    if tune_streams:
        # Constraint 8: every group a trial may use exists before the first trial.
        runtime.stream_groups(reducer.process_set, max(kwargs.get("streams", STREAM_COUNTS)))
    return Autotuner(reducer, tune_bucket=tune_bucket, tune_streams=tune_streams, overlap=overlap,
                     overlap_initial=bool(cfg.overlap_step) if overlap is not None else False, **kwargs)
