"""The autotuner on 2 real gloo ranks: tuned training equals untuned training, every rank decides the same,
user-fixed knobs are kept, drift starts a new search.

Tolerance: none. With 2 ranks each element of a reduced gradient is ``(a + b) * 0.5`` whatever the bucket
it travels in (a float sum of two numbers is commutative), so parameters trained while the tuner switches
bucket plans and stream counts must equal, bitwise, those trained with a fixed plan.
"""

from __future__ import annotations

import pytest
import torch

from shoal.testing import run_ranks

_STEPS = 55
_WIDTH = 256  # 12 x 256 x 256 floats: 3 MB of gradients in 24 tensors, so 1/2/4 MB buckets plan differently


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(12):
        layers += [torch.nn.Linear(_WIDTH, _WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def _train(opt, model, steps: int, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(16, _WIDTH, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _tuned_vs_fixed():
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    rank = hvd.rank()
    tuned, fixed = _model(), _model()
    opt_t = hvd.DistributedOptimizer(torch.optim.SGD(tuned.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=tuned.named_parameters())
    # Every knob given to the optimizer: fixed by the user, so no tuner (and one step at the end).
    opt_f = hvd.DistributedOptimizer(torch.optim.SGD(fixed.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=fixed.named_parameters(),
                                     fusion_threshold_mb=25.0, num_streams=2, overlap_step=False)
    _train(opt_t, tuned, _STEPS, rank)
    _train(opt_f, fixed, _STEPS, rank)
    assert opt_f.engine.autotune is None
    summary = opt_t.engine.autotune
    same = all(torch.equal(p, q) for p, q in zip(tuned.parameters(), fixed.parameters()))
    views = all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(tuned.parameters(), opt_t.engine.views))
    return same, views, summary


@pytest.mark.timeout(120)
def test_tuned_training_equals_untuned_and_ranks_agree():
    results = run_ranks(_tuned_vs_fixed, world_size=2, timeout_s=90)
    for rank, (same, views, summary) in enumerate(results):
        assert same, f"rank {rank}: tuned parameters differ from the fixed-plan run"
        assert views, f"rank {rank}: a gradient is not a view into the reducer's buckets after re-planning"
        assert summary["state"] == "settled"
        assert summary["settled_at"] is not None and summary["settled_at"] <= 50
    s0, s1 = results[0][2], results[1][2]
    assert s0["choice"] == s1["choice"] and s0["settled_at"] == s1["settled_at"]
    assert s0["trials"] == s1["trials"]  # the scores are the reduced (max over ranks) times
    # The search really changed the plan: more than one bucket size and stream count were tried.
    assert len({t["bucket_mb"] for t in s0["trials"]}) >= 2
    assert len({t["num_streams"] for t in s0["trials"]}) >= 2
    # The overlapped step (momentum SGD: exact) was tried too, and changed no value either.
    assert s0["tune_overlap"] is True and {t["overlap_step"] for t in s0["trials"]} == {False, True}


def _which_dims(kwargs: dict):
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), **kwargs)
    _train(opt, model, 2, hvd.rank())
    t = opt.engine.autotune
    return None if t is None else (t["tune_bucket"], t["tune_streams"], t["tune_overlap"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("env, kwargs, expected", [
    ({}, {}, (True, True, True)),
    ({"SHOAL_AUTOTUNE": "0"}, {}, None),
    ({"SHOAL_NUM_STREAMS": "2"}, {}, (True, False, True)),             # env var, even at the default value
    ({"SHOAL_FUSION_THRESHOLD_MB": "8"}, {}, (False, True, True)),
    ({}, {"fusion_threshold_mb": 4.0}, (False, True, True)),           # optimizer keyword
    ({}, {"num_streams": 3, "fusion_threshold_mb": 4.0}, (False, False, True)),  # only the step left
    ({"SHOAL_OVERLAP_STEP": "0"}, {}, (True, True, False)),
    ({}, {"overlap_step": False}, (True, True, False)),
    ({}, {"num_streams": 3, "fusion_threshold_mb": 4.0, "overlap_step": True}, None),  # nothing left
    ({"SHOAL_NAN_CHECK": "skip"}, {}, (True, True, False)),           # not exact with the check on
], ids=["default", "autotune-off", "env-streams", "env-bucket", "kwarg-bucket", "kwarg-both", "env-overlap",
        "kwarg-overlap", "kwarg-all", "nan-check"])
def test_user_fixed_knobs_are_kept(env, kwargs, expected):
    results = run_ranks(_which_dims, world_size=2, timeout_s=60, env=env, args=(kwargs,))
    assert results == [expected, expected]


class _FakeClock:
    """Step times from a schedule: 10 ms per step, 30 ms once ``slow_from`` end_step calls happened."""

    def __init__(self, slow_from: int):
        self.t, self.calls, self.slow_from = 0.0, 0, slow_from

    def __call__(self) -> float:
        self.calls += 1
        self.t += 0.030 if self.calls > self.slow_from else 0.010
        return self.t


def _drift():
    import shoal.torch as hvd  # noqa: PLC0415
    torch.set_num_threads(1)
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters())
    _train(opt, model, 1, hvd.rank())  # builds the reducer (and the default tuner)
    opt.engine.start_autotune(sizes_mb=(1.0, 4.0), streams=(1, 2), drift_window_steps=2, drift_windows=2,
                              retune_cooldown_steps=0, clock=_FakeClock(slow_from=60))
    _train(opt, model, 100, hvd.rank())
    s = opt.engine.autotune
    return s["searches"], [h["kind"] for h in s["history"]].count("drift"), s["state"]


@pytest.mark.timeout(120)
def test_drift_starts_a_new_search():
    results = run_ranks(_drift, world_size=2, timeout_s=90)
    assert results[0] == results[1]
    searches, drifts, state = results[0]
    assert searches == 2 and drifts == 1 and state == "settled"
