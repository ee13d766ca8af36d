"""``shoal.torch.DistributedOptimizer`` against single-process training, on 2 real gloo ranks.

Every rank also trains a single-process reference locally (the same model on the concatenated batch of
both ranks), so each test compares within the rank and returns only numbers and small tensors.

Tolerance (fp32). The distributed gradient is ``(mean(half0) + mean(half1)) / 2``, the reference one
``mean(half0 ++ half1)``: the same math with another summation order, so each gradient element differs by
a few ulps (relative ~1e-7). Over a handful of steps with lr <= 0.5 that moves parameters by far less than
``_ATOL = 1e-6`` times the parameter scale (max(1, max |p|)). Measured max differences: 3e-8 (MLPs,
SGD and Adam, every bucket layout), 1.2e-7 (tied weights), 4.8e-7 (sparse embedding: 1 ulp at |p| ~ 4).
For Adam, whose update is ``m / sqrt(v)``, the data is drawn so that no gradient element sits at ~0 (tanh
MLP, dense random inputs), where a rounding difference could change the update's sign.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from shoal.testing import run_ranks

_ATOL = 1e-6
_STEPS = 4
_BATCH = 16  # full batch; each of the 2 ranks gets half


def _setup() -> tuple[int, int]:
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    return hvd.rank(), hvd.size()


def _mlp(seed: int = 0, width: int = 32, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, width), torch.nn.Tanh()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, 4))
    return torch.nn.Sequential(*layers)


def _batch(step: int, n: int = _BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _half(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def _loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _scale(m: torch.nn.Module) -> float:
    return max(1.0, max(p.abs().max().item() for p in m.parameters()))


def _make_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    raise ValueError(kind)


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in m.parameters()]


def _assert_ranks_equal(results, key="params"):
    """Both ranks apply the same reduced gradient, so their parameters are bitwise equal."""
    for a, b in zip(results[0][key], results[1][key]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------- plain training
def _rank_train(kind: str, engine_options: dict, device: str = "cpu"):
    """``device``: where the model and batches live (tests/gpu runs it with ``"cuda"`` over gloo)."""
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp().to(device)
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt(kind, model.parameters()),
                                   named_parameters=model.named_parameters(), **engine_options)
    ref_opt = _make_opt(kind, ref.parameters())
    for step in range(_STEPS):
        x, y = (t.to(device) for t in _batch(step))
        opt.zero_grad()
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        opt.step()
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_opt.step()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "params": _params(model),
            "buckets": opt.engine.num_buckets, "moved": _max_diff(model, _mlp().to(device)),
            "device": str(next(model.parameters()).device)}


_ENGINES = {
    "default": ({}, 1),  # the whole model fits the 1 MB first bucket
    # ~1 KB buckets: every weight (1-4 KB) travels alone, biases share; 3 buckets in flight.
    "tiny_buckets_3_streams": ({"fusion_threshold_mb": 1e-3, "first_bucket_mb": 5e-4, "num_streams": 3}, 6),
    # Horovod's groups=: 3 explicit buckets (every third parameter), sizes ignored.
    "groups_3": ({"groups": 3}, 3),
    # Horovod's older spelling of groups=<int>.
    "num_groups_2": ({"num_groups": 2}, 2),
}


@pytest.mark.parametrize(("kind", "engine"), [
    ("sgd", "default"), ("adam", "default"), ("sgd", "tiny_buckets_3_streams"),
    ("adam", "tiny_buckets_3_streams"), ("sgd", "groups_3"), ("sgd", "num_groups_2")])
def test_training_equals_single_process(kind, engine):
    options, buckets = _ENGINES[engine]
    _check_training(run_ranks(_rank_train, world_size=2, timeout_s=60, args=(kind, options)), buckets)


def _check_training(results, buckets: int, atol: float = _ATOL) -> None:
    """What :func:`_rank_train` must show on every rank (tests/gpu checks its CUDA runs with this too)."""
    for r in results:
        assert r["moved"] > 1e-3, "training did not move the parameters; the comparison would be empty"
        assert r["diff"] <= atol * r["scale"], (r["diff"], r["device"])
        assert r["buckets"] == buckets
    _assert_ranks_equal(results)


class _Shuffled(torch.nn.Module):
    """Layers registered in an order unrelated to use, so backward order != reverse registration order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Linear(16, 4)   # used last: its gradients are ready first
        self.a = torch.nn.Linear(8, 16)   # used first: ready last
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _rank_ready_order():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _Shuffled()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   fusion_threshold_mb=1e-6, first_bucket_mb=1e-6)  # one tensor per bucket
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        opt.step()
    return [names[0] for names in opt.engine.buckets]


def test_bucket_plan_follows_the_real_ready_order():
    for names in run_ranks(_rank_ready_order, world_size=2, timeout_s=60):
        layers = [n.split(".")[0] for n in names]
        assert layers[:2] == ["c", "c"] and layers[2:4] == ["b", "b"] and layers[4:] == ["a", "a"], names


# --------------------------------------------------------------------------------- accumulation
def _rank_accumulate():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=2)
    ref_opt = _make_opt("sgd", ref.parameters())
    for step in range(_STEPS):
        x, y = _batch(step)
        xs, ys = _half(x, rank, world), _half(y, rank, world)
        opt.zero_grad()
        for micro in range(2):  # two micro-batches of a quarter each; loss / 2 so the sum is the mean
            (_loss(model, _half(xs, micro, 2), _half(ys, micro, 2)) / 2).backward()
        opt.step()
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_opt.step()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "params": _params(model)}


def test_backward_passes_per_step():
    results = run_ranks(_rank_accumulate, world_size=2, timeout_s=60)
    for r in results:
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


# --------------------------------------------------------------------------------- clipping, AMP
def _rank_clip():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                   named_parameters=model.named_parameters())
    ref_opt = _make_opt("sgd", ref.parameters())
    norms = []
    for step in range(_STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        opt.synchronize()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with opt.skip_synchronize():
            opt.step()
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        norms.append((norm.item(), ref_norm.item()))
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "norms": norms, "params": _params(model)}


def test_clipping_pattern_equals_single_process_clip():
    results = run_ranks(_rank_clip, world_size=2, timeout_s=60)
    for r in results:
        for norm, ref_norm in r["norms"]:
            assert norm > 0.05, "clipping must be active for the test to mean anything"
            assert norm == pytest.approx(ref_norm, rel=1e-5)  # norm of the averaged gradient
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


def _rank_grad_scaler(inf_step: int):
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("adam", model.parameters()),
                                   named_parameters=model.named_parameters())
    ref_opt = _make_opt("adam", ref.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    skipped = []
    for step in range(_STEPS):
        x, y = _batch(step)
        if step == inf_step:
            x[-1, 0] = float("inf")  # only in rank 1's half
        before = _params(model)
        opt.zero_grad()
        scaler.scale(_loss(model, _half(x, rank, world), _half(y, rank, world))).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        skipped.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))

        ref_opt.zero_grad()
        ref_scaler.scale(_loss(ref, x, y)).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 10.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "skipped": skipped,
            "loss_scale": scaler.get_scale(), "ref_loss_scale": ref_scaler.get_scale(),
            "params": _params(model)}


def test_grad_scaler_pattern_and_inf_skips_on_every_rank():
    # Scaling by a power of two is exact, so the reference tolerance is the plain-training one. The inf
    # enters only rank 1's input at step 1; after the allreduce every rank sees it, so every rank skips
    # that step and halves its scale, like the single-process reference on the full batch.
    results = run_ranks(_rank_grad_scaler, world_size=2, timeout_s=60, args=(1,))
    for r in results:
        assert r["skipped"] == [False, True, False, False]
        assert r["loss_scale"] == r["ref_loss_scale"] == 2.0 ** 9
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


# --------------------------------------------------------------------------------- parameter kinds
class _Tied(torch.nn.Module):
    """A language-model-like toy: embedding and output projection share one Parameter; one frozen layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.mid = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(torch.tanh(self.frozen(self.emb(idx))))))


def _tokens(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 20, (_BATCH,), generator=g), torch.randint(0, 20, (_BATCH,), generator=g)


def _rank_frozen_tied():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _Tied()
    ref = copy.deepcopy(model)
    frozen0 = _params(model.frozen)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ce = torch.nn.functional.cross_entropy
    for step in range(_STEPS):
        x, y = _tokens(step)
        opt.zero_grad()
        ce(model(_half(x, rank, world)), _half(y, rank, world)).backward()
        opt.step()
        ref_opt.zero_grad()
        ce(ref(x), y).backward()
        ref_opt.step()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "params": _params(model),
            "frozen_same": all(torch.equal(a, b) for a, b in zip(frozen0, model.frozen.parameters())),
            "frozen_grads": [p.grad for p in model.frozen.parameters()],
            "still_tied": model.out.weight is model.emb.weight}


def test_frozen_and_tied_parameters():
    results = run_ranks(_rank_frozen_tied, world_size=2, timeout_s=60)
    for r in results:
        assert r["frozen_same"] and r["frozen_grads"] == [None, None]
        assert r["still_tied"]
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


class _SparseModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30, 8, sparse=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def _rank_sparse(sparse_as_dense: bool):
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _SparseModel()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(), sparse_as_dense=sparse_as_dense)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    layouts = []
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", FutureWarning)  # the sparse exchange used a name torch 2.13 renamed
        for step in range(_STEPS):
            g = torch.Generator().manual_seed(step)
            # Indices 0..14 on rank 0 and 10..29 on rank 1 overlap on 10..14 (values summed across ranks),
            # with repeats inside a rank (summed by coalescing).
            x = torch.cat([torch.randint(0, 15, (_BATCH // 2,), generator=g),
                           torch.randint(10, 30, (_BATCH // 2,), generator=g)])
            y = torch.randn(_BATCH, 4, generator=g)
            opt.zero_grad()
            _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
            opt.synchronize()
            layouts.append(str(model.emb.weight.grad.layout))
            with opt.skip_synchronize():
                opt.step()
            ref_opt.zero_grad()
            _loss(ref, x, y).backward()
            ref_opt.step()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "params": _params(model),
            "layouts": layouts, "warned": [str(w.message) for w in warned if "deprecated" in str(w.message)]}


@pytest.mark.parametrize("sparse_as_dense", [False, True])
def test_sparse_embedding_gradients(sparse_as_dense):
    results = run_ranks(_rank_sparse, world_size=2, timeout_s=60, args=(sparse_as_dense,))
    # sparse_as_dense reduces the gradient as a dense tensor and hands it back sparse, as Horovod documents
    # ("convert back to sparse before applying the update"): SparseAdam accepts nothing else.
    for r in results:
        assert set(r["layouts"]) == {"torch.sparse_coo"}
        assert not r["warned"], r["warned"]
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


def _rank_no_sync():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    local = model[-1].bias
    local._shoal_no_sync = True
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                   named_parameters=model.named_parameters())
    out = []
    for step in range(2):
        x, y = _batch(step)
        xs, ys = _half(x, rank, world), _half(y, rank, world)
        opt.zero_grad()
        _loss(model, xs, ys).backward()
        opt.synchronize()
        ref.zero_grad()
        _loss(ref, xs, ys).backward()  # this rank's own gradient
        out.append({"local": local.grad.clone(), "own": ref[-1].bias.grad.clone(),
                    "synced": model[0].weight.grad.clone()})
        with opt.skip_synchronize():
            opt.step()
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters()):
                p.copy_(q)
    return out


def test_no_sync_parameters_keep_their_own_gradient():
    results = run_ranks(_rank_no_sync, world_size=2, timeout_s=60)
    for r in results:
        for s in r:
            assert torch.equal(s["local"], s["own"])  # untouched: not even scaled
    for s0, s1 in zip(*results):
        assert not torch.allclose(s0["local"], s1["local"])
        assert torch.equal(s0["synced"], s1["synced"])


# --------------------------------------------------------------------------------- ops and scaling
def _rank_ops():
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.core.ops import ReduceOp  # noqa: PLC0415

    rank, world = _setup()
    x, y = _batch(0)
    ref = _mlp()
    _loss(ref, x, y).backward()
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    out = {}
    for label, kwargs, factor in [("sum", {"op": ReduceOp.Sum}, 2.0),
                                  ("sum_name", {"op": "Sum"}, 2.0),
                                  ("predivide", {"gradient_predivide_factor": 2.0}, 1.0),
                                  ("predivide_4", {"gradient_predivide_factor": 4.0}, 1.0)]:
        model = _mlp()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), **kwargs)
        for _ in range(2):  # step 1 (discovery) and step 2 (buckets during backward)
            opt.zero_grad()
            _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
            opt.synchronize()
            diff = max((p.grad - factor * g).abs().max().item() for p, g in zip(model.parameters(), ref_grads))
            out.setdefault(label, []).append(diff)
            opt.zero_grad()
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(_mlp().parameters(), lr=0.1), op="Sum",
                                 gradient_predivide_factor=2.0)
        out["predivide_sum_raised"] = False
    except ValueError:
        out["predivide_sum_raised"] = True
    return out


def test_op_sum_and_gradient_predivide_factor():
    # Gradients (max |g| ~ 0.5) against the reference full-batch gradient times 2 (Sum) or 1 (Average
    # with predivide: multiply by 1/f, sum, multiply by f/2): a few ulps, well inside 1e-6.
    for r in run_ranks(_rank_ops, world_size=2, timeout_s=60):
        assert r.pop("predivide_sum_raised")
        for label, diffs in r.items():
            assert max(diffs) <= 1e-6, (label, diffs)


def _rank_named_errors():
    import shoal.torch as hvd  # noqa: PLC0415

    _setup()
    model = _mlp()
    errors = {}
    cases = {
        "missing": list(model.named_parameters())[:-1],
        "duplicate": [("w", p) for p in model.parameters()],
        "not_pairs": list(model.parameters()),
    }
    for label, named in cases.items():
        try:
            hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named)
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    # Extra names the optimizer does not hold are fine (Horovod allows a superset).
    other = torch.nn.Linear(2, 2)
    hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                             named_parameters=list(model.named_parameters()) + list(other.named_parameters()))
    return errors


def test_named_parameters_mismatch_errors():
    (errors,) = run_ranks(_rank_named_errors, world_size=1, timeout_s=30)
    assert errors["missing"] is not None and "HINT" in errors["missing"]
    assert errors["duplicate"] is not None and "'w'" in errors["duplicate"]
    assert errors["not_pairs"] is not None and "pairs" in errors["not_pairs"]


# --------------------------------------------------------------------------------- zero_grad, views
def _rank_misuse():
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.core.errors import ShoalError  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                   named_parameters=model.named_parameters())
    zero_grad, skip = [], []
    for step in range(3):  # step 0 discovers, steps 1-2 reduce during backward
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        try:
            opt.zero_grad()
            zero_grad.append(None)
        except ShoalError as exc:
            zero_grad.append(str(exc))
        try:  # the clipping pattern without its synchronize(): would apply unreduced gradients
            with opt.skip_synchronize():
                opt.step()
            skip.append(None)
        except ShoalError as exc:
            skip.append(str(exc))
        opt.step()  # the right call: keeps the ranks in step
    return zero_grad, skip


def test_misuse_raises_with_a_hint():
    # zero_grad() between backward and step() (Horovod raises too: it would race with the allreduce);
    # step() under skip_synchronize() without synchronize(). Both on the discovery step and later.
    for zero_grad, skip in run_ranks(_rank_misuse, world_size=2, timeout_s=60):
        assert all(m is not None and "zero_grad" in m and "HINT" in m for m in zero_grad), zero_grad
        assert all(m is not None and "synchronize()" in m and "HINT" in m for m in skip), skip


def _rank_model_zero_grad_set_to_none():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                   named_parameters=model.named_parameters())
    ref_opt = _make_opt("sgd", ref.parameters())
    in_buffers = []
    for step in range(_STEPS):
        x, y = _batch(step)
        model.zero_grad(set_to_none=True)  # user code drops the views
        assert all(p.grad is None for p in model.parameters())
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        opt.step()
        if opt.engine.built:
            # constraint 2 of the optimizer: gradients are views into the engine's buffers again
            ptrs = {b.untyped_storage().data_ptr() for b in opt.engine.buffers}
            in_buffers.append(all(p.grad.untyped_storage().data_ptr() in ptrs for p in model.parameters()))
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_opt.step()
    return {"diff": _max_diff(model, ref), "scale": _scale(ref), "in_buffers": in_buffers,
            "params": _params(model)}


def test_user_zero_grad_set_to_none_still_works():
    results = run_ranks(_rank_model_zero_grad_set_to_none, world_size=2, timeout_s=60)
    for r in results:
        assert r["in_buffers"] == [True] * _STEPS
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
    _assert_ranks_equal(results)


# --------------------------------------------------------------------------------- optimizer surface
def _rank_scheduler_state_dict():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("adam", model.parameters()),
                                   named_parameters=model.named_parameters())
    ref_opt = _make_opt("adam", ref.parameters())
    out = {"is_optimizer": isinstance(opt, torch.optim.Optimizer)}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = _batch(step)
            opt.zero_grad()
            _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
            opt.step()
            sched.step()
            ref_opt.zero_grad()
            _loss(ref, x, y).backward()
            ref_opt.step()
            ref_sched.step()
    out["warnings"] = [str(w.message) for w in caught]
    out["lr"] = opt.param_groups[0]["lr"]
    out["diff"], out["scale"] = _max_diff(model, ref), _scale(ref)

    # state_dict round trip: a fresh wrapper over a copy continues exactly like the original.
    sd = copy.deepcopy(opt.state_dict())  # torch's load_state_dict keeps (shares) same-device tensors
    model2 = copy.deepcopy(model)
    opt2 = hvd.DistributedOptimizer(_make_opt("adam", model2.parameters()),
                                    named_parameters=model2.named_parameters())
    opt2.load_state_dict(sd)
    out["lr2"] = opt2.param_groups[0]["lr"]
    for step in range(3, 5):
        x, y = _batch(step)
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            _loss(m, _half(x, rank, world), _half(y, rank, world)).backward()
            o.step()
    out["round_trip_equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    out["steps"] = [s["step"].item() for s in opt2.state.values()]
    return out


def test_lr_scheduler_and_state_dict_round_trip():
    for r in run_ranks(_rank_scheduler_state_dict, world_size=2, timeout_s=60):
        assert r["is_optimizer"]
        assert r["warnings"] == []
        assert r["lr"] == r["lr2"] == 0.01 * 0.5 ** 3
        assert r["diff"] <= _ATOL * r["scale"], r["diff"]
        assert r["round_trip_equal"]
        assert set(r["steps"]) == {5.0}


def _rank_world_one():
    import shoal.torch as hvd  # noqa: PLC0415

    _setup()
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(_make_opt("adam", model.parameters()),
                                   named_parameters=model.named_parameters())
    ref_opt = _make_opt("adam", ref.parameters())
    hooks = [getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()]
    for step in range(_STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, x, y).backward()
        if step == 1:  # the clipping pattern is a no-op wrapper here too
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        ref_opt.zero_grad()
        _loss(ref, x, y).backward()
        ref_opt.step()
    return {"hooks": [h for h in hooks if h], "built": opt.engine.built,
            "equal": all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())),
            "size": hvd.size()}


def test_world_size_one_is_the_bare_optimizer():
    (r,) = run_ranks(_rank_world_one, world_size=1, timeout_s=30)
    assert r["size"] == 1
    assert r["hooks"] == [] and not r["built"]
    assert r["equal"]  # bitwise: nothing touched the gradients


def _rank_broadcast():
    import shoal.torch as hvd  # noqa: PLC0415

    rank, _ = _setup()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    torch.manual_seed(100 + rank)  # different weights per rank
    for p in model.parameters():
        torch.nn.init.normal_(p)
    for _ in range(rank + 1):  # different BatchNorm buffers and num_batches_tracked (1 and 2)
        model(torch.randn(16, 8) * (rank + 1))
    inner = torch.optim.Adam(model.parameters(), lr=0.01 * (rank + 1))
    if rank == 0:  # only rank 0 has optimizer state
        model.eval()
        model(torch.randn(16, 8)).sum().backward()
        model.train()
        inner.step()
        inner.zero_grad()
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in inner.state.values()]
    # named_parameters() form: perturb rank 1 again and broadcast from rank 0.
    if rank == 1:
        with torch.no_grad():
            model[0].weight.add_(1.0)
    hvd.broadcast_parameters(model.named_parameters(), root_rank=0)
    return {"sd": sd, "state": state, "lr": inner.param_groups[0]["lr"], "w": model[0].weight.detach().clone()}


def test_broadcast_parameters_and_optimizer_state():
    r0, r1 = run_ranks(_rank_broadcast, world_size=2, timeout_s=60)
    assert r0["sd"].keys() == r1["sd"].keys()
    for k in r0["sd"]:
        assert torch.equal(r0["sd"][k], r1["sd"][k]), k
    assert r1["sd"]["1.num_batches_tracked"].item() == 1
    assert len(r0["state"]) == len(r1["state"]) == 6
    for s0, s1 in zip(r0["state"], r1["state"]):
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]) if torch.is_tensor(s0[k]) else s0[k] == s1[k]
    assert r0["lr"] == r1["lr"] == 0.01
    assert torch.equal(r0["w"], r1["w"])


def _rank_bad_keywords():
    import shoal.torch as hvd  # noqa: PLC0415

    _setup()
    model = _mlp()
    errors = []
    for kwargs in ({"fusion_treshold_mb": 4}, {"num_groups": 2, "groups": 3}, {"fusion_threshold_mb": 0},
                   {"first_bucket_mb": -1}, {"num_streams": 0}, {"nan_check": "loud"}):
        try:
            hvd.DistributedOptimizer(_make_opt("sgd", model.parameters()),
                                     named_parameters=model.named_parameters(), **kwargs)
            errors.append(None)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    return errors


def test_unknown_keywords_and_bad_values_fail_at_construction():
    # One resolver for the optimizer's keywords over the config: 0 is no longer "the default" and a
    # negative size is refused, each naming the knob.
    for typo, both, zero, negative, streams, choice in run_ranks(_rank_bad_keywords, world_size=2, timeout_s=60):
        assert typo is not None and "fusion_treshold_mb" in typo and "fusion_threshold_mb" in typo, typo
        assert both is not None and "num_groups" in both, both
        assert zero is not None and "fusion_threshold_mb must be > 0, got 0.0" in zero, zero
        assert negative is not None and "first_bucket_mb must be > 0, got -1.0" in negative, negative
        assert streams is not None and "num_streams must be >= 1" in streams, streams
        assert choice is not None and "nan_check='loud' is not one of raise, skip, warn, off" in choice, choice


# --------------------------------------------------------------------------------- overlapped step
class _SGDSubclass(torch.optim.SGD):
    """A subclass may override step with something global: never stepped bucket by bucket."""


def _rank_overlap(variant: str):
    import shoal.torch as hvd  # noqa: PLC0415

    rank, world = _setup()
    model = _mlp(width=64)
    unused = torch.nn.Parameter(torch.ones(3))  # in the optimizer, never in the graph: no gradient anywhere
    params = list(model.parameters())
    groups = [{"params": params[:4] + [unused], "weight_decay": 0.1}, {"params": params[4:], "lr": 0.02}]
    if variant == "subclass":
        inner = _SGDSubclass(groups, lr=0.1, momentum=0.9)
    else:
        inner = torch.optim.AdamW(groups, lr=0.01)
    calls = [0]
    original = inner.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    inner.step = counted  # an instance attribute, not a step hook: it does not turn the overlap off
    if variant == "hook":
        inner.register_step_pre_hook(lambda *_: None)
    named = list(model.named_parameters()) + [("unused", unused)]
    opt = hvd.DistributedOptimizer(inner, named_parameters=named,
                                   fusion_threshold_mb=4e-3, first_bucket_mb=2e-3, num_streams=3)
    per_step = []
    for step in range(_STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model, _half(x, rank, world), _half(y, rank, world)).backward()
        before = calls[0]
        opt.step()
        per_step.append(calls[0] - before)
    return {"params": _params(model), "unused": unused.detach().clone(), "calls": per_step,
            "buckets": opt.engine.num_buckets}


@pytest.mark.parametrize("variant", ["adamw", "hook", "subclass"])
def test_overlapped_step_is_bitwise_one_step_at_the_end(variant):
    """Stepping each bucket's parameters as soon as it is reduced gives bitwise the parameters of one
    step after the last bucket (the default), in every step, with two parameter groups of their
    own hyper-parameters and a parameter that never gets a gradient (AdamW would decay it if stepped).
    Step hooks or an optimizer subclass turn the overlap off: one inner step per step."""
    on = run_ranks(_rank_overlap, world_size=2, timeout_s=60, args=(variant,), env={"SHOAL_OVERLAP_STEP": "1"})
    off = run_ranks(_rank_overlap, world_size=2, timeout_s=60, args=(variant,))  # the default
    for a, b in zip(on, off):
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)
        assert torch.equal(a["unused"], torch.ones(3)) and torch.equal(b["unused"], torch.ones(3))
        assert b["calls"] == [1] * _STEPS
        assert a["buckets"] > 2
        if variant == "adamw":
            # Step 1 discovers the order (one step); from step 2 on one inner step per bucket at most,
            # plus none at the end (every managed parameter was stepped with its bucket).
            assert a["calls"][0] == 1 and all(1 < c <= a["buckets"] for c in a["calls"][1:]), a["calls"]
        else:
            assert a["calls"] == [1] * _STEPS, a["calls"]
    _assert_ranks_equal(on)
