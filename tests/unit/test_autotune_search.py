"""The autotuner's search, without a process group: a stand-in reducer and a clock whose step time is a
known function of the setting in force, so that the right answer is known.

What is checked: it finds the optimum of a cost surface, settles within 50 steps even with a big grid,
does not score the step after a change, tries each distinct plan once, keeps fixed dimensions, and
starts again when step time drifts.
"""

from __future__ import annotations

import math

import torch

from shoal.core.autotune import MAX_TUNING_STEPS, Autotuner, Setting
from shoal.core.buckets import TensorSpec, plan_buckets

_MB = 1024 * 1024


class _ProcessSet:
    ranks = (0,)
    group = None


class _Reducer:
    """What the tuner uses of a GradientReducer: specs/order/sizes, reconfigure(), world, buffers."""

    def __init__(self, tensors: int = 64, tensor_mb: float = 1.0, bucket_mb: float = 25.0, streams: int = 2):
        numel = int(tensor_mb * _MB) // 4
        self.specs = [TensorSpec(f"w{i}", (numel,), torch.float32, torch.device("cpu")) for i in range(tensors)]
        self.order = list(range(tensors - 1, -1, -1))
        self.first_bucket_nbytes = _MB
        self.bucket_nbytes = int(bucket_mb * _MB)
        self.num_streams = streams
        self.process_set = _ProcessSet()
        self.world = 1
        self.buffers = [torch.empty(0)]
        self.groups = None
        self.calls: list[tuple[int, int]] = []

    def _plan(self, nbytes: int) -> list:
        return [p.tensor_ids for p in plan_buckets(self.specs, self.order, bucket_nbytes=nbytes,
                                                    first_bucket_nbytes=self.first_bucket_nbytes)]

    def reconfigure(self, *, bucket_nbytes=None, num_streams=None) -> bool:
        self.calls.append((bucket_nbytes, num_streams))
        self.num_streams = num_streams
        changed = self._plan(bucket_nbytes) != self._plan(self.bucket_nbytes)
        self.bucket_nbytes = bucket_nbytes
        return changed


class _Clock:
    """Each call ends a step whose time is ``cost(bucket_mb, streams)`` of the setting in force; the first
    step after a change costs ``change_penalty_s`` more (page faults of new buffers, in real life)."""

    def __init__(self, red: _Reducer, cost, change_penalty_s: float = 0.0):
        self.red, self.cost, self.penalty = red, cost, change_penalty_s
        self.t, self.last = 0.0, None

    def __call__(self) -> float:
        now = (self.red.bucket_nbytes, self.red.num_streams)
        self.t += self.cost(self.red.bucket_nbytes / _MB, self.red.num_streams)
        if self.last is not None and now != self.last:
            self.t += self.penalty
        self.last = now
        return self.t


def _run(tuner: Autotuner, steps: int) -> None:
    for _ in range(steps):
        tuner.end_step()


def _bowl(best_mb: float, best_streams: int):
    return lambda mb, s: 0.100 + 0.005 * abs(math.log2(mb / best_mb)) + 0.003 * abs(s - best_streams)


def test_finds_the_optimum_and_settles_within_50_steps():
    red = _Reducer()
    tuner = Autotuner(red, clock=_Clock(red, _bowl(8.0, 3), change_penalty_s=1.0))
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.settled_at <= MAX_TUNING_STEPS
    assert tuner.choice == Setting(8.0, 3)
    assert (red.bucket_nbytes, red.num_streams) == (8 * _MB, 3)
    # A penalty of 1 s on every first step after a change would decide everything if it were scored.
    assert max(t.score_s for t in tuner.trials.values()) < 0.2


def test_a_big_grid_is_trimmed_to_fit_the_step_bound():
    red = _Reducer(tensors=256, tensor_mb=0.5)
    sizes = tuple(2.0 ** k for k in range(-2, 9))  # 0.25 .. 256 MB: 11 distinct plans here
    tuner = Autotuner(red, sizes_mb=sizes, clock=_Clock(red, _bowl(2.0, 1)))
    assert tuner._worst_case_steps(len(tuner.sizes_mb)) <= MAX_TUNING_STEPS
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.settled_at <= MAX_TUNING_STEPS
    assert tuner.choice == Setting(2.0, 1)  # near the configured 25 MB in log scale: kept by the trim


def test_sizes_with_the_same_plan_are_tried_once_and_streams_stop_at_the_bucket_count():
    red = _Reducer(tensors=2, tensor_mb=0.25)  # 0.5 MB in all: every size gives one plan, 1 bucket
    tuner = Autotuner(red, clock=_Clock(red, lambda mb, s: 0.05))
    _run(tuner, 30)
    # One bucket: 1 stream and 2 streams are the same setting, so there is nothing to try but the configured one.
    assert list(tuner.trials) == [Setting(25.0, 2)]
    assert tuner.state == "settled" and tuner.settled_at == 1 + 3 and red.calls == []


def test_fixed_dimensions_are_left_alone():
    red = _Reducer()
    tuner = Autotuner(red, tune_streams=False, clock=_Clock(red, _bowl(4.0, 4)))
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.choice == Setting(4.0, 2) and {t.num_streams for t in tuner.trials} == {2}
    red = _Reducer()
    tuner = Autotuner(red, tune_bucket=False, clock=_Clock(red, _bowl(4.0, 4)))
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.choice == Setting(25.0, 4) and {t.bucket_mb for t in tuner.trials} == {25.0}


def test_drift_starts_a_new_search_and_a_steady_run_does_not():
    red = _Reducer()
    slow = {"factor": 1.0}

    def cost(mb, s):
        return _bowl(8.0, 2)(mb, s) * slow["factor"]

    tuner = Autotuner(red, drift_window_steps=5, drift_windows=2, retune_cooldown_steps=0,
                      clock=_Clock(red, cost))
    _run(tuner, 200)
    assert tuner.searches == 1 and tuner.state == "settled"
    slow["factor"] = 1.5  # e.g. another job now shares the link
    _run(tuner, 25)
    assert tuner.searches == 2
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.choice == Setting(8.0, 2)


def test_summary_is_plain_data():
    red = _Reducer()
    tuner = Autotuner(red, clock=_Clock(red, _bowl(8.0, 2)))
    _run(tuner, MAX_TUNING_STEPS)
    s = tuner.summary()
    assert s["choice"] == "8 MB x 2 streams" and s["choice_bucket_mb"] == 8.0 and s["choice_num_streams"] == 2
    assert all(set(t) == {"setting", "bucket_mb", "num_streams", "overlap_step", "median_ms", "score_ms",
                          "samples"} for t in s["trials"])
    assert s["tune_overlap"] is False and s["choice_overlap_step"] is False
    assert [h["kind"] for h in s["history"]][-1] == "settle"


def test_a_burst_of_load_during_the_best_trial_does_not_decide():
    red = _Reducer()
    clock = _Clock(red, _bowl(8.0, 2))
    burst = {"left": 1}

    def noisy() -> float:
        t = clock()
        if red.bucket_nbytes == 8 * _MB and tuner._measuring is not None and tuner._warm_left == 0 \
                and burst["left"]:
            burst["left"] -= 1  # one scored step of the best setting is hit by a neighbour: +0.5 s
            clock.t += 0.5
            t += 0.5
        return t

    tuner = Autotuner(red, clock=noisy)
    _run(tuner, MAX_TUNING_STEPS)
    assert burst["left"] == 0 and tuner.choice == Setting(8.0, 2)


def test_the_configured_setting_measured_in_a_slow_start_is_measured_again_in_the_run_off():
    # The machine is slower in the job's first steps (the configured setting is measured first), then
    # steady: the configured 25 MB is truly best, and only a second look later in time can show it.
    red = _Reducer()
    steps = {"n": 0}
    cost = lambda mb: 0.100 + 0.010 * abs(math.log2(mb / 25.0))  # noqa: E731

    class _Slowstart(_Clock):
        def __call__(self) -> float:
            steps["n"] += 1
            self.t += 0.040 * max(0.0, 1.0 - steps["n"] / 12.0)
            return super().__call__()

    tuner = Autotuner(red, clock=_Slowstart(red, lambda mb, s: cost(mb) + 0.003 * abs(s - 2)))
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.choice == Setting(25.0, 2)
    assert len(tuner.trials[Setting(25.0, 2)].samples_s) > 2  # measured again, late


class _Switch:
    """The frontend's overlapped-step switch: the clock reads it, the tuner flips it."""

    def __init__(self):
        self.on, self.calls = None, []

    def __call__(self, on: bool) -> None:
        self.on = on
        self.calls.append(on)


def _with_overlap(red: _Reducer, switch: _Switch, cost):
    """Step time as ``cost(bucket_mb, streams, overlapped)``."""
    return _Clock(red, lambda mb, s: cost(mb, s, bool(switch.on)))


def test_tries_the_overlapped_step_and_keeps_it_where_it_wins_with_the_stream_count_that_suits_it():
    # As on a slow wire with momentum SGD: the overlapped step hides ~40 ms, and with it one stream is
    # best (the big bucket goes first, a small one lands last); without it, 2 streams.
    def cost(mb, s, ov):
        base = 0.100 + 0.005 * abs(math.log2(mb / 8.0))
        return base + (0.003 * abs(s - 1) if ov else 0.040 + 0.003 * abs(s - 2))
    red, switch = _Reducer(), _Switch()
    tuner = Autotuner(red, clock=_with_overlap(red, switch, cost), overlap=switch)
    assert switch.calls == [False]  # the switch starts where the search starts
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.choice == Setting(8.0, 1, True) and switch.on is True
    assert tuner.settled_at <= MAX_TUNING_STEPS
    assert tuner.summary()["choice"] == "8 MB x 1 stream, overlapped step"
    assert tuner.summary()["choice_overlap_step"] is True


def test_leaves_the_overlapped_step_off_where_it_loses():
    # As on loopback with ranks sharing cores: the overlapped step competes with gloo's threads.
    def cost(mb, s, ov):
        return 0.100 + 0.005 * abs(math.log2(mb / 4.0)) + 0.003 * abs(s - 2) + (0.020 if ov else 0.0)
    red, switch = _Reducer(), _Switch()
    tuner = Autotuner(red, clock=_with_overlap(red, switch, cost), overlap=switch)
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.choice == Setting(4.0, 2, False) and switch.on is False
    assert True in switch.calls  # it was tried
    assert any(t.overlap for t in tuner.trials)


def test_the_worst_case_with_the_overlapped_step_still_fits_50_steps():
    red, switch = _Reducer(tensors=200, tensor_mb=0.5), _Switch()
    tuner = Autotuner(red, clock=_with_overlap(red, switch, lambda mb, s, ov: 0.1), overlap=switch,
                      sizes_mb=(1, 2, 4, 8, 16, 32, 64, 128), streams=(1, 2, 3, 4))
    _run(tuner, MAX_TUNING_STEPS)
    assert tuner.state == "settled" and tuner.settled_at <= MAX_TUNING_STEPS
