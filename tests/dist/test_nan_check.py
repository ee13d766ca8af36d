"""The NaN/Inf check on real gloo ranks: attribution to parameter, rank and step; raise / skip / warn on
every rank alike; the DDP comm hook; the module drill-down; AMP's GradScaler under ``raise``.

Every scenario injects on rank 1 (or 0) only and checks what *every* rank reports. The skip scenario has
a single-process reference (the same model trained on the average of both ranks' gradients, step 3
left out); tolerance float32 rtol 1e-5, atol 1e-6 (the average is g0 + g1 then * 0.5 in both, so the
results are in practice bitwise equal; the tolerance only absorbs a different summation order).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.testing import run_ranks

NAMES = ["head.weight", "head.bias", "mid.weight", "mid.bias", "body.weight", "body.bias"]
# Tiny buckets so that the six gradients travel in several buckets (mid.weight, 4 KB, travels alone).
ENGINE = {"fusion_threshold_mb": 0.002, "first_bucket_mb": 0.001}


class _Log(nn.Module):
    """``log(x)``: the real source of a forward NaN when an input is negative."""

    def forward(self, x):
        return torch.log(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat = _Log()
        self.body = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(self.feat(x))))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return 0.5 + torch.rand(16, 8, generator=g), torch.randn(16, 4, generator=g)


def _setup(nan_check=None, momentum=0.0, device="cpu", **engine):
    import shoal.torch as hvd

    torch.manual_seed(0)
    model = _Net().to(device)
    kwargs = {**ENGINE, **engine}
    if nan_check is not None:
        kwargs["nan_check"] = nan_check
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                                   named_parameters=model.named_parameters(), **kwargs)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, opt


def _inject(model, name: str, at: dict, rank: int, value: float):
    """Gradient hook on parameter ``name``: at step ``at["step"] == at["when"]`` on ``rank``, one value
    of the gradient becomes ``value``."""
    import shoal.torch as hvd

    def hook(g):
        if at["step"] == at["when"] and hvd.rank() == rank:
            g = g.clone()
            g.view(-1)[min(5, g.numel() - 1)] = value
        return g

    dict(model.named_parameters())[name].register_hook(hook)


def _summary(report) -> dict:
    return {"step": report.step, "names": report.names, "ranks": list(report.ranks),
            "kinds": sorted(report.kinds), "counts": [(t.nan_count, t.inf_count) for t in report.tensors],
            "policy": report.policy, "text": report.describe()}


# ----------------------------------------------------------------------------------------- raise

def _raise_rank(kind: str, target: str, device: str = "cpu"):
    from shoal.core.checks import NonFiniteGradientError

    model, opt = _setup("raise", device=device)
    at = {"step": 0, "when": 3}
    _inject(model, target, at, rank=1, value=float("nan") if kind == "nan" else float("inf"))
    for step in range(1, 6):
        at["step"] = step
        x, y = (t.to(device) for t in _batch(torch.distributed.get_rank(), step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
        except NonFiniteGradientError as err:
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            return {**_summary(err.report), "message": str(err), "at_step": step, "unchanged": unchanged}
        assert opt.nan_report is None
    return None


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_injected_value_is_named_on_every_rank(kind):
    _check_raised(kind, run_ranks(_raise_rank, world_size=2, timeout_s=60, args=(kind, "mid.weight")))


def _counts(kind: str, counted: bool) -> list:
    """The (NaN, Inf) counts a report holds for the one injected value: exact on the CPU; on CUDA the
    check knows only the kind (shoal.core.checks, constraint 3)."""
    if not counted:
        return [(None, None)]
    return [(1, 0)] if kind == "nan" else [(0, 1)]


def _check_raised(kind: str, results, counted: bool = True) -> None:
    """What :func:`_raise_rank` must show on every rank (tests/gpu: ``counted=False`` on CUDA)."""
    for r in results:
        assert r is not None, "no rank raised"
        assert r["at_step"] == 3 and r["step"] == 3
        assert r["names"] == ["mid.weight"]
        assert r["ranks"] == [1]
        assert r["kinds"] == [kind]
        assert r["counts"] == _counts(kind, counted)
        assert r["policy"] == "raise"
        assert r["unchanged"], "a raising step must not touch the weights"
        assert "'mid.weight'" in r["message"] and "rank 1" in r["message"] and "step 3" in r["message"]
        assert "HINT" in r["message"]
    assert results[0]["message"] == results[1]["message"], "every rank raises the same error"


# ------------------------------------------------------------------------------------------ skip

def _reference_weights(skip_step: int, steps: int, device: str = "cpu") -> list[torch.Tensor]:
    """Single process: SGD(momentum) on the average of both ranks' gradients, ``skip_step`` left out."""
    torch.manual_seed(0)
    model = _Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, steps + 1):
        if step == skip_step:
            continue
        grads = []
        for rank in (0, 1):
            x, y = (t.to(device) for t in _batch(rank, step))
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) * 0.5
        opt.step()
    return [p.detach() for p in model.parameters()]


def _skip_rank(kind: str, device: str = "cpu"):
    model, opt = _setup("skip", momentum=0.9, device=device)
    at = {"step": 0, "when": 3}
    _inject(model, "body.bias", at, rank=1, value=float("nan") if kind == "nan" else float("inf"))
    reports = {}
    for step in range(1, 7):
        at["step"] = step
        x, y = (t.to(device) for t in _batch(torch.distributed.get_rank(), step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        weights = [p.detach().clone() for p in model.parameters()]
        momenta = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state]
        opt.step()
        if opt.nan_report is not None:
            reports[step] = _summary(opt.nan_report)
            assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters())), "weights changed"
            assert all(torch.equal(a, opt.state[p]["momentum_buffer"])
                       for a, p in zip(momenta, model.parameters())), "optimizer state changed"
    ref = _reference_weights(skip_step=3, steps=6, device=device)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    return {"skipped": opt.skipped_steps, "reports": reports,
            "weights": [p.detach().cpu().clone() for p in model.parameters()]}


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_skip_keeps_weights_and_state_identical_and_training_goes_on(kind):
    _check_skipped(kind, run_ranks(_skip_rank, world_size=2, timeout_s=60, args=(kind,)))


def _check_skipped(kind: str, results, counted: bool = True) -> None:
    """What :func:`_skip_rank` must show on every rank (tests/gpu: ``counted=False`` on CUDA)."""
    for r in results:
        assert r["skipped"] == 1
        assert list(r["reports"]) == [3]
        rep = r["reports"][3]
        assert rep["names"] == ["body.bias"] and rep["ranks"] == [1] and rep["policy"] == "skip"
        assert rep["kinds"] == [kind] and rep["counts"] == _counts(kind, counted)
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(a, b), "ranks diverged"
        assert torch.isfinite(a).all()


# -------------------------------------------------------------------------- warn, knob, overflow

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _warn_rank(device: str = "cpu"):
    from shoal.core import runtime

    records = _Records()
    logging.getLogger("shoal.core.checks").addHandler(records)
    logging.getLogger("shoal.core.checks").setLevel(logging.DEBUG)
    model, opt = _setup(None, device=device)  # the policy comes from SHOAL_NAN_CHECK
    at = {"step": 0, "when": 2}
    _inject(model, "head.bias", at, rank=0, value=float("-inf"))
    out = {"knob": runtime.config().nan_check, "reports": {}}
    for step in range(1, 3):  # step 2 applies an Inf: a step 3 would be non-finite everywhere
        at["step"] = step
        x, y = (t.to(device) for t in _batch(torch.distributed.get_rank(), step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if opt.nan_report is not None:
            out["reports"][step] = _summary(opt.nan_report)
            out["applied"] = not torch.isfinite(model.head.bias).all().item()
    out["warnings"] = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    # Overflow false alarm: finite values whose sum is Inf must not trip (the exact scan clears them).
    big, opt2 = _setup("raise", device=device)
    x, y = (t.to(device) for t in _batch(0, 1))
    F.mse_loss(big(x), y).backward()
    if torch.distributed.get_rank() == 0:
        big.mid.weight.grad.view(-1)[:2] = 3e38  # sums to Inf in float32, yet every value is finite
    opt2.synchronize()
    out["overflow_report"] = opt2.nan_report
    return out


def test_warn_from_the_config_knob_logs_and_applies_and_overflow_does_not_trip():
    _check_warned(run_ranks(_warn_rank, world_size=2, timeout_s=60, env={"SHOAL_NAN_CHECK": "warn"}))


def _check_warned(results) -> None:
    """What :func:`_warn_rank` must show on every rank (the same on CUDA)."""
    for rank, r in enumerate(results):
        assert r["knob"] == "warn"
        assert list(r["reports"]) == [2]
        rep = r["reports"][2]
        assert rep["names"] == ["head.bias"] and rep["ranks"] == [0] and rep["kinds"] == ["inf"]
        assert r["applied"], "warn applies the step"
        if rank == 0:  # loud on the first rank and on the offending ranks (both are rank 0 here)
            assert any("'head.bias'" in w and "nan_check='warn'" in w for w in r["warnings"])
        else:
            assert not r["warnings"]
        assert r["overflow_report"] is None


# -------------------------------------------------------------- a real forward NaN, and drill-down

def _forward_nan_rank():
    from shoal.torch.nan_drilldown import drill_down

    model, opt = _setup("skip")
    rank = torch.distributed.get_rank()
    out = {}
    for step in range(1, 6):
        x, y = _batch(rank, step)
        if step == 3 and rank == 1:
            x[0, 0] = -1.0  # log(-1) = NaN inside module 'feat': a real forward NaN

        def loss_fn(x=x, y=y, step=step):
            loss = F.mse_loss(model(x), y)
            if step == 5 and rank == 1:  # NaN made by the loss itself: sqrt of a negative number
                loss = loss + torch.sqrt(model(x).mean() - 10.0)
            return loss

        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        report = opt.nan_report
        if report is not None:
            found = drill_down(model, loss_fn, report)
            out[step] = {**_summary(report),
                         "drill": {r: (f.forward and (f.forward.module, f.forward.kind, f.forward.inputs_finite),
                                       f.backward and (f.backward.module, f.backward.kind), f.loss_finite,
                                       f.describe()) for r, f in found.items()}}
    out["skipped"] = opt.skipped_steps
    return out


def test_forward_nan_of_one_rank_is_traced_to_that_rank_and_module():
    results = run_ranks(_forward_nan_rank, world_size=2, timeout_s=60)
    for r in results:
        assert r["skipped"] == 2 and sorted(k for k in r if isinstance(k, int)) == [3, 5]
        for step in (3, 5):
            rep = r[step]
            assert rep["ranks"] == [1] and rep["step"] == step and rep["kinds"] == ["nan"]
            # Every gradient of rank 1 is NaN; the first ones backward reached come first.
            assert sorted(rep["names"]) == sorted(NAMES)
            assert set(rep["names"][:2]) == {"head.weight", "head.bias"}
            assert set(rep["names"][2:4]) == {"mid.weight", "mid.bias"}
            assert list(rep["drill"]) == [1]
        fwd, bwd, loss_finite, text = r[3]["drill"][1]
        assert fwd == ("feat", "nan", True), "the module that made the NaN, from finite inputs"
        assert not loss_finite and "'feat' (_Log)" in text
        fwd, bwd, loss_finite, text = r[5]["drill"][1]
        assert fwd is None and not loss_finite, "every module output finite; the loss made the NaN"
        assert bwd == ("head", "nan") and "loss computation" in text
    assert results[0][3] == results[1][3] and results[0][5] == results[1][5]


# ------------------------------------------------------------------------------------- DDP hook

def _ddp_rank():
    import shoal.torch as hvd
    from shoal.core.checks import NonFiniteGradientError
    from torch.nn.parallel import DistributedDataParallel

    rank = torch.distributed.get_rank()
    out = {"skip": {}}
    # skip: the hook reports; the script skips its own step when state.nan_report is set.
    torch.manual_seed(0)
    model = _Net()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.002)
    state, hook = hvd.comm_hook(nan_check="skip", named_parameters=model.named_parameters())
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    at = {"step": 0, "when": 2}
    _inject(model, "mid.bias", at, rank=1, value=float("nan"))
    for step in range(1, 5):
        at["step"] = step
        opt.zero_grad()
        F.mse_loss(ddp(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
        if state.nan_report is None:
            opt.step()
        else:
            out["skip"][step] = _summary(state.nan_report)
    out["finite"] = all(torch.isfinite(p).all().item() for p in model.parameters())
    # raise: backward itself raises, on every rank.
    torch.manual_seed(0)
    model2 = _Net()
    ddp2 = DistributedDataParallel(model2, bucket_cap_mb=0.002)
    ddp2.register_comm_hook(*hvd.comm_hook(nan_check="raise", named_parameters=model2.named_parameters()))
    at2 = {"step": 1, "when": 1}
    _inject(model2, "body.weight", at2, rank=1, value=float("inf"))
    try:
        F.mse_loss(ddp2(_batch(rank, 1)[0]), _batch(rank, 1)[1]).backward()
    except Exception as exc:  # noqa: BLE001 (DDP may wrap it)
        out["raised"] = (isinstance(exc, NonFiniteGradientError), str(exc))
    return out


def test_ddp_comm_hook_reports_skips_and_raises_on_every_rank():
    results = run_ranks(_ddp_rank, world_size=2, timeout_s=60)
    for r in results:
        assert list(r["skip"]) == [2]
        rep = r["skip"][2]
        assert rep["names"] == ["mid.bias"] and rep["ranks"] == [1] and rep["step"] == 2
        assert r["finite"], "the skipped step left the weights finite"
        assert "raised" in r, "backward did not raise under nan_check='raise'"
        is_ours, text = r["raised"]
        assert is_ours, f"backward raised something else: {text}"
        assert "'body.weight'" in text and "rank 1" in text and "step 1" in text
    assert results[0]["skip"] == results[1]["skip"]


# ------------------------------------------------------------------------------------ GradScaler

def _scaler_rank(policy: str = "raise", deferred: bool = False):
    """AMP's pattern under nan_check='raise' or 'skip': an Inf from rank 1 is GradScaler's to skip, not
    ours (the reduced gradients hold it on every rank, so GradScaler sees it everywhere). ``deferred``: a
    fused SGD with the verdict kept on the device (the CUDA path, on CPU tensors)."""
    if deferred:
        from shoal.core.checks import FiniteCheck

        FiniteCheck.defer = True
        model, opt = _deferred_setup(policy, "sgd_fused", "cpu")
    else:
        model, opt = _setup(policy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    at = {"step": 0, "when": 2}
    _inject(model, "mid.weight", at, rank=1, value=float("inf"))
    out = {"reports": {}, "skipped_by_scaler": []}
    for step in range(1, 4):
        at["step"] = step
        x, y = _batch(torch.distributed.get_rank(), step)
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        before = [p.detach().clone() for p in model.parameters()]
        with opt.skip_synchronize():
            scaler.step(opt)  # must not raise: GradScaler found the Inf and does not call opt.step()
        scaler.update()
        out["skipped_by_scaler"].append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
        if opt.nan_report is not None:
            out["reports"][step] = _summary(opt.nan_report)
    out["skipped_steps"] = opt.skipped_steps
    out["scale"] = scaler.get_scale()
    out["weights"] = [p.detach().clone() for p in model.parameters()]
    return out


@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_grad_scaler_skips_inf_steps_itself(policy, deferred):
    results = run_ranks(_scaler_rank, world_size=2, timeout_s=60, args=(policy, deferred))
    for r in results:
        assert r["reports"].get(2, {}).get("policy") == policy
        assert r["skipped_by_scaler"] == [False, True, False]
        assert list(r["reports"]) == [2] and r["reports"][2]["names"] == ["mid.weight"]
        assert r["reports"][2]["ranks"] == [1]
        assert r["skipped_steps"] == 0, "a step GradScaler skipped is not counted as ours"
        assert r["scale"] == 2.0 ** 9
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(a, b), "ranks diverged"


# ------------------------------------------------------------------ a process set that is not the world

def _process_set_rank():
    """World 3, process set [1, 2]; NaN injected on world rank 2 into the optimizer's and the DDP hook's
    gradients. Rank 0 is not a member and only takes part in creating the set."""
    import shoal.torch as hvd
    from shoal.core.checks import NonFiniteGradientError
    from shoal.torch.nan_drilldown import drill_down
    from torch.nn.parallel import DistributedDataParallel

    from shoal.core import runtime

    rank = torch.distributed.get_rank()
    pair = hvd.add_process_set([1, 2])
    # Creating groups is collective over the whole world (torch): the set's stream groups, which the
    # members' reducer and hook use, are made here by every rank, so the non-member can leave.
    runtime.stream_groups(pair, runtime.config().num_streams)
    if rank not in pair.ranks:
        return None
    out = {}
    # DistributedOptimizer on the set, raise; then the drill-down on the set (replays on world rank 2).
    torch.manual_seed(0)
    model = _Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), process_set=pair,
                                   named_parameters=model.named_parameters(), nan_check="raise", **ENGINE)
    x, y = _batch(rank, 1)
    if rank == 2:
        x[0, 0] = -1.0  # log(-1): a real forward NaN on world rank 2 (rank 1 inside the set)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    closure().backward()
    try:
        opt.step()
    except NonFiniteGradientError as err:
        found = drill_down(model, closure, err.report, process_set=pair)
        out["optimizer"] = {**_summary(err.report), "message": str(err),
                            "drill": {r: (f.forward.module if f.forward else None) for r, f in found.items()}}
    # The DDP hook on the set, skip: the report names world rank 2 on both members.
    torch.manual_seed(0)
    model2 = _Net()
    ddp = DistributedDataParallel(model2, process_group=pair.group, bucket_cap_mb=0.002)
    state, hook = hvd.comm_hook(process_set=pair, nan_check="skip", named_parameters=model2.named_parameters())
    ddp.register_comm_hook(state, hook)
    at = {"step": 1, "when": 1}
    _inject(model2, "mid.bias", at, rank=2, value=float("nan"))
    F.mse_loss(ddp(_batch(rank, 1)[0]), _batch(rank, 1)[1]).backward()
    out["hook"] = _summary(state.nan_report) if state.nan_report is not None else None
    return out


def test_reports_on_a_process_set_name_world_ranks():
    results = run_ranks(_process_set_rank, world_size=3, timeout_s=90, pg_timeout_s=40)
    assert results[0] is None
    for r in results[1:]:
        rep = r.get("optimizer")
        assert rep is not None, "the optimizer on the set did not raise"
        assert rep["ranks"] == [2] and rep["step"] == 1 and "on rank 2:" in rep["message"], rep
        assert "rank 1" not in rep["message"], "a rank inside the set was reported as a world rank"
        assert rep["drill"] == {2: "feat"}, rep["drill"]
        hook = r["hook"]
        assert hook is not None and hook["names"] == ["mid.bias"] and hook["ranks"] == [2], hook
        assert hook["policy"] == "skip" and "rank 2" in hook["text"]
    assert results[1] == results[2]


# ------------------------------------------------------------- the verdict kept on the device (deferred)

OPTIMIZERS = {
    "sgd_fused": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
    "adam_fused": lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),  # takes no found_inf
}


def _deferred_setup(policy: str, optim: str, device: str):
    import shoal.torch as hvd

    torch.manual_seed(0)
    model = _Net().to(device)
    opt = hvd.DistributedOptimizer(OPTIMIZERS[optim](model.parameters()), named_parameters=model.named_parameters(),
                                   nan_check=policy, **ENGINE)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, opt


def _deferred_run(policy: str, optim: str, device: str, defer, when: int) -> dict:
    """Five steps with a NaN in rank 1's 'mid.weight' at step ``when``; ``defer``: FiniteCheck.defer
    (False: the host reads each verdict in step(); True/None: kept on the device where it can be)."""
    from shoal.core.checks import FiniteCheck, NonFiniteGradientError

    FiniteCheck.defer = defer
    model, opt = _deferred_setup(policy, optim, device)
    at = {"step": 0, "when": when}
    _inject(model, "mid.weight", at, rank=1, value=float("nan"))
    out = {"raised": None, "reports": {}, "kept_on_device": [], "after": {}}
    for step in range(1, 6):
        at["step"] = step
        x, y = (t.to(device) for t in _batch(torch.distributed.get_rank(), step))
        try:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        except NonFiniteGradientError as err:
            out["raised"] = {"at": step, **_summary(err.report), "message": str(err), "deferred": err.deferred}
            break
        out["kept_on_device"].append(opt._deferred is not None)  # the verdict was not read in step()
        out["after"][step] = [p.detach().cpu().clone() for p in model.parameters()]
        if policy != "raise":  # every rank reads it: under "raise" the next step's start raises instead
            if opt.nan_report is not None:
                out["reports"][step] = _summary(opt.nan_report)
    out["skipped"] = opt.skipped_steps
    out["weights"] = [p.detach().cpu().clone() for p in model.parameters()]
    out["state"] = [{k: v.detach().cpu().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                    for p in model.parameters()]
    return out


def _deferred_rank(policy: str, optim: str, device: str, when: int) -> dict:
    """The same run with the verdict read on the host in step() and kept on the device."""
    return {"host": _deferred_run(policy, optim, device, False, when),
            "deferred": _deferred_run(policy, optim, device, True if device == "cpu" else None, when)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal values, NaN equal to NaN (under warn the NaN is applied on both paths)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _without_counts(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("counts", "text")}


def _check_deferred(policy: str, optim: str, when: int, results) -> None:
    """Deferred == host, bitwise: weights, optimizer state, skipped_steps, the report (but for the exact
    counts, which only the host check has); ``raise`` raises at the next step's start naming the step."""
    fused = optim.endswith("_fused")
    for r in results:
        host, lazy = r["host"], r["deferred"]
        for a, b in zip(host["weights"], lazy["weights"]):
            assert _same(a, b), "the deferred path changed the weights"
        for sa, sb in zip(host["state"], lazy["state"]):
            assert sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa), "state differs"
        assert host["skipped"] == lazy["skipped"] == (1 if policy == "skip" else 0)
        # Kept on the device where it can be: warn always; skip/raise with a fused optimizer, after its
        # first step that ran (whose state a skipped fused kernel would leave unset).
        first_run = 2 if (when == 1 and policy == "skip") else 1
        expect_kept = [policy == "warn" or (fused and s > first_run)
                       for s in range(1, len(lazy["kept_on_device"]) + 1)]
        assert lazy["kept_on_device"] == expect_kept
        assert not any(host["kept_on_device"])
        assert {s: _without_counts(v) for s, v in host["reports"].items()} == \
               {s: _without_counts(v) for s, v in lazy["reports"].items()}
        if policy == "raise":
            h, d = host["raised"], lazy["raised"]
            assert h["at"] == when and h["step"] == when and not h["deferred"]
            assert d["step"] == when and f"at step {when}" in d["message"]
            assert f"not updated by step {when}" in d["message"] and f"not updated by step {when}" in h["message"]
            lazy_raise = fused and when > 1
            assert d["at"] == (when + 1 if lazy_raise else when) and d["deferred"] == lazy_raise
            assert d["names"] == ["mid.weight"] and d["ranks"] == [1] and d["kinds"] == ["nan"]
            # The weights when it raised are those after step when-1, on both paths.
            assert len(lazy["after"]) == when - 1 or lazy_raise
            for a, b in zip(lazy["weights"], host["after"].get(when - 1, lazy["weights"])):
                assert torch.equal(a, b), "the tripped step updated the weights"
        else:  # skip: one report; warn applied the NaN, so later steps report again
            assert min(lazy["reports"]) == when and (policy == "warn" or list(lazy["reports"]) == [when])
            assert lazy["reports"][when]["names"][0] == "mid.weight" and lazy["reports"][when]["ranks"] == [1]
    if policy == "raise":
        assert results[0]["deferred"]["raised"] == results[1]["deferred"]["raised"], "the same error everywhere"
    for a, b in zip(results[0]["deferred"]["weights"], results[1]["deferred"]["weights"]):
        assert _same(a, b), "ranks diverged"


@pytest.mark.parametrize("policy,optim,when", [
    ("skip", "sgd_fused", 3), ("skip", "adam_fused", 3), ("skip", "sgd", 3), ("skip", "sgd_fused", 1),
    ("raise", "sgd_fused", 3), ("raise", "adam_fused", 3), ("raise", "sgd", 3), ("raise", "sgd_fused", 1),
    ("warn", "sgd_fused", 3), ("warn", "sgd", 3)])
def test_deferred_verdict_equals_the_host_verdict(policy, optim, when):
    _check_deferred(policy, optim, when, run_ranks(_deferred_rank, world_size=2, timeout_s=60,
                                                   args=(policy, optim, "cpu", when)))


def _one_rank_reads_rank(device: str = "cpu"):
    """Rank 0 alone reads ``skipped_steps`` right after a tripped step, then both ranks run a collective of
    their own: reading the count is one host read, never a collective, so nothing pairs up wrongly."""
    import shoal.torch as hvd
    from shoal.core.checks import FiniteCheck

    FiniteCheck.defer = True if device == "cpu" else None
    model, opt = _deferred_setup("skip", "sgd_fused", device)
    at = {"step": 0, "when": 2}
    _inject(model, "mid.weight", at, rank=1, value=float("inf"))
    seen = []
    for step in range(1, 5):
        at["step"] = step
        x, y = (t.to(device) for t in _batch(torch.distributed.get_rank(), step))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if hvd.rank() == 0:
            seen.append(opt.skipped_steps)
        hvd.allreduce(torch.ones(3, device=device), name=f"user.{step}")
    return {"seen": seen, "skipped": opt.skipped_steps, "report": _summary(opt.nan_report) if opt.nan_report else None,
            "weights": [p.detach().cpu().clone() for p in model.parameters()]}


def test_skipped_steps_read_on_one_rank_is_no_collective():
    results = run_ranks(_one_rank_reads_rank, world_size=2, timeout_s=60)
    assert results[0]["seen"] == [0, 1, 1, 1]
    for r in results:
        assert r["skipped"] == 1 and r["report"] is None  # the last step was finite
        assert all(torch.isfinite(w).all() for w in r["weights"])
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(a, b), "ranks diverged"


# --------------------------------------------- large gradients: summed part by part as they are loaded

class _Wide(nn.Module):
    """One gradient of 1.1 M elements (more than shoal.core.reducer.LOAD_PART: summed in two parts as it
    is loaded) between small ones (summed together at launch)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 1100)
        self.wide = nn.Linear(1100, 1000)
        self.out = nn.Linear(1000, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.wide(torch.tanh(self.inp(x)))))


def _wide_rank():
    import shoal.torch as hvd
    from shoal.core.reducer import LOAD_PART

    torch.manual_seed(0)
    model = _Wide()
    assert model.wide.weight.numel() > LOAD_PART
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), nan_check="skip")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    at = {"step": 0}

    def wide_hook(g):
        if at["step"] == 3 and hvd.rank() == 1:  # an Inf in the second part of the wide gradient
            g = g.clone()
            g.view(-1)[LOAD_PART + 7] = float("inf")
        if at["step"] == 4 and hvd.rank() == 0:  # finite values whose part sum overflows: no trip
            g = g.clone()
            g.view(-1)[:2] = 3e38
        return g

    def bias_hook(g):  # and a NaN in a small gradient, summed with its neighbours at launch
        if at["step"] == 3 and hvd.rank() == 1:
            g = g.clone()
            g[1] = float("nan")
        return g

    model.wide.weight.register_hook(wide_hook)
    model.out.bias.register_hook(bias_hook)
    out = {}
    for step in range(1, 5):
        at["step"] = step
        x, y = _batch(hvd.rank(), step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if opt.nan_report is not None:
            out[step] = _summary(opt.nan_report)
    return {"reports": out, "skipped": opt.skipped_steps}


def test_large_gradient_is_checked_part_by_part_with_exact_counts():
    for r in run_ranks(_wide_rank, world_size=2, timeout_s=60):
        assert list(r["reports"]) == [3] and r["skipped"] == 1
        rep = r["reports"][3]
        assert sorted(rep["names"]) == ["out.bias", "wide.weight"] and rep["ranks"] == [1]
        assert sorted(rep["counts"]) == [(0, 1), (1, 0)] and rep["kinds"] == ["inf", "nan"]
