"""PartialFC on real gloo ranks against a single-process full softmax on the concatenated batch.

Reference: one process holds the whole weight, computes ``cross_entropy(margin(normalize(E) @ normalize(W).T),
labels)`` on every rank's rows concatenated, and backpropagates through the same linear backbone.

Tolerance (float64 everywhere): rtol=1e-9, atol=1e-11 (observed max abs error ~1e-13; the loss is O(10),
gradients O(1)). The fp16 path (bfloat16 matmul on CPU) is checked against float32 at rtol=3e-2 on the loss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo  # noqa: F401  (see below)
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shoal.parallel import ArcFace, CombinedMargin, CosFace, PartialFC, exclude_from_ddp, load_full_weight, \
    mark_no_sync, shard_range
from shoal.testing import RanksFailed, run_ranks

# The first torch optimizer imports torch._dynamo, which writes TORCHINDUCTOR_CACHE_DIR into os.environ;
# importing it at collection keeps the conftest leak guard from blaming whichever test builds one first.

RTOL, ATOL = 1e-9, 1e-11
IN_DIM, DIM, LOCAL_BATCH = 6, 8, 4
MARGINS = {
    "arcface": lambda: ArcFace(s=16.0, m=0.5),
    "cosface": lambda: CosFace(s=16.0, m=0.35),
    "combined": lambda: CombinedMargin(s=16.0, m1=1.0, m2=0.3, m3=0.2),
}


def _data(world: int, num_classes: int, seed: int = 0):
    """Inputs, labels, backbone and classifier weight of the global batch (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    rows = world * LOCAL_BATCH
    x = torch.randn(rows, IN_DIM, generator=g, dtype=torch.float64)
    # Repeated labels and labels on every shard; class 0 and the last class always present.
    labels = torch.randint(0, num_classes, (rows,), generator=g)
    labels[0], labels[-1] = 0, num_classes - 1
    labels[1] = labels[2]
    backbone_w = torch.randn(DIM, IN_DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(num_classes, DIM, generator=g, dtype=torch.float64)
    # Make a few targets nearly aligned with their class (large cosines exercise the margin clamps).
    weight[labels[3]] = (x[3] @ backbone_w.T) * 1.5
    return x, labels, backbone_w, weight


def _margin_logits(margin, cos, labels):
    """The margin in plain autograd ops (independent of the fused backward PartialFC uses)."""
    rows = torch.arange(cos.shape[0])
    return (cos * margin.s).index_put((rows, labels), margin.target_logit(cos[rows, labels]) * margin.s)


def _reference(margin, x, labels, backbone_w, weight):
    """Loss, embedding grad, backbone grad and weight grad of one process on the whole batch."""
    bw = backbone_w.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    emb = x @ bw.T
    emb.retain_grad()
    cos = F.linear(F.normalize(emb), F.normalize(w))
    loss = F.cross_entropy(_margin_logits(margin, cos, labels), labels)
    loss.backward()
    return loss.detach(), emb.grad, bw.grad, w.grad


FULL_CLASSES = 11                   # 11 % 2 and 11 % 3 != 0: uneven shards
SAMPLED_CLASSES, SAMPLE_RATE = 50, 0.3  # 50 % 3 != 0


def _me_and_world() -> tuple[int, int]:
    # A world of one runs in the pytest process, without a process group (PartialFC supports that).
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _one_step(num_classes: int, sample_rate: float, device: str = "cpu") -> dict:
    """Each margin, one forward/backward on this rank; returns what the parent compares (on the CPU)."""
    me, world = _me_and_world()
    x, labels, backbone_w, weight = (t.to(device) for t in _data(world, num_classes))
    mine = slice(me * LOCAL_BATCH, (me + 1) * LOCAL_BATCH)
    out = {}
    for name, make in MARGINS.items():
        pfc = PartialFC(DIM, num_classes, make(), sample_rate=sample_rate, dtype=torch.float64, seed=3,
                        device=device)
        if sample_rate < 1:
            pfc.bind_optimizer(torch.optim.SGD(pfc.parameters(), lr=0.1))  # binding alone changes nothing
        assert getattr(pfc.weight, "_shoal_no_sync") is True
        with torch.no_grad():
            pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
        bw = backbone_w.clone().requires_grad_()
        emb = x[mine] @ bw.T
        emb.retain_grad()
        loss = pfc(emb, labels[mine])
        loss.backward()
        # What a data-parallel optimizer does with the backbone: average over ranks.
        if world > 1:
            dist.all_reduce(bw.grad)
            bw.grad /= world
        out[name] = {
            "range": (pfc.class_start, pfc.class_end), "loss": loss.detach().cpu(), "emb_grad": emb.grad.cpu(),
            "backbone_grad": bw.grad.cpu(), "weight_grad": pfc.weight.grad.cpu(),
            "sampled": None if pfc.last_sampled_classes is None else pfc.last_sampled_classes.cpu(),
            "num_sample": pfc.num_sample,
        }
    return out


def _fp16_and_predict(device: str = "cpu") -> tuple:
    """fp16=True against float32 (on CUDA the logits are float16, on the CPU bfloat16), and predict()."""
    me, world = _me_and_world()
    x, labels, backbone_w, weight = (t.to(device) for t in _data(world, FULL_CLASSES))
    mine = slice(me * LOCAL_BATCH, (me + 1) * LOCAL_BATCH)
    emb = (x[mine] @ backbone_w.T).float()
    losses = {}
    for fp16 in (False, True):
        pfc = PartialFC(DIM, FULL_CLASSES, CosFace(s=16.0, m=0.35), fp16=fp16, device=device)
        with torch.no_grad():
            pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
        e = emb.clone().requires_grad_()
        loss = pfc(e, labels[mine])
        loss.backward()
        losses[fp16] = (loss.item(), e.grad.cpu(), pfc.weight.grad.cpu())
    ids, cos = pfc.predict(emb)
    return losses, ids.cpu(), cos.cpu()


def _rank_all_steps(device: str = "cpu") -> dict:
    """One launch per world size serves every numerical test (launches dominate the test time)."""
    return {"full": _one_step(FULL_CLASSES, 1.0, device), "sampled": _one_step(SAMPLED_CLASSES, SAMPLE_RATE, device),
            "fp16": _fp16_and_predict(device)}


_RUNS: dict[int, list] = {}


def _run(world: int) -> list[dict]:
    if world not in _RUNS:
        _RUNS[world] = [_rank_all_steps()] if world == 1 else \
            run_ranks(_rank_all_steps, world_size=world, timeout_s=60)
    return _RUNS[world]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_equals_single_process_full_softmax(world):
    _check_full_softmax(world, [res["full"] for res in _run(world)])


def _check_full_softmax(world: int, results: list[dict]) -> None:
    """Every rank's :func:`_one_step` at sample rate 1 against :func:`_reference` (tests/gpu: also on CUDA)."""
    x, labels, backbone_w, weight = _data(world, FULL_CLASSES)
    starts = [shard_range(FULL_CLASSES, world, r)[0] for r in range(world)]
    assert [res["arcface"]["range"][0] for res in results] == starts
    for name, make in MARGINS.items():
        ref_loss, ref_emb, ref_bb, ref_w = _reference(make(), x, labels, backbone_w, weight)
        for r, res in enumerate(results):
            got = res[name]
            lo, hi = got["range"]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(got["weight_grad"], ref_w[lo:hi], rtol=RTOL, atol=ATOL)
            # Embedding gradient = size x gradient of the global mean loss (constraint 1 of partial_fc.py) ...
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            torch.testing.assert_close(got["emb_grad"] / world, ref_emb[rows], rtol=RTOL, atol=ATOL)
            # ... so that the data-parallel average of the backbone gradient is exact.
            torch.testing.assert_close(got["backbone_grad"], ref_bb, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampling_equals_softmax_restricted_to_sampled_classes(world):
    _check_sampled_softmax(world, [res["sampled"] for res in _run(world)])


def _check_sampled_softmax(world: int, results: list[dict]) -> None:
    """Every rank's sampled :func:`_one_step` against the softmax over the sampled classes."""
    x, labels, backbone_w, weight = _data(world, SAMPLED_CLASSES)
    for name, make in MARGINS.items():
        sampled = torch.cat([res[name]["sampled"] for res in results])
        assert torch.equal(sampled, sampled.sort().values) and sampled.unique().numel() == sampled.numel()
        assert torch.isin(labels, sampled).all(), "every class of the global batch must be kept"
        for res in results:
            lo, hi = res[name]["range"]
            positives = labels[(labels >= lo) & (labels < hi)].unique().numel()
            assert res[name]["sampled"].numel() == max(res[name]["num_sample"], positives) < hi - lo
        ref_loss, ref_emb, ref_bb, ref_w = _reference(make(), x, torch.searchsorted(sampled, labels),
                                                      backbone_w, weight[sampled])
        for r, res in enumerate(results):
            got = res[name]
            lo, hi = got["range"]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=RTOL, atol=ATOL)
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            torch.testing.assert_close(got["emb_grad"] / world, ref_emb[rows], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(got["backbone_grad"], ref_bb, rtol=RTOL, atol=ATOL)
            # Sampled rows get the restricted gradient; the others none.
            expected = torch.zeros(hi - lo, DIM, dtype=torch.float64)
            mine = (sampled >= lo) & (sampled < hi)
            expected[sampled[mine] - lo] = ref_w[mine]
            torch.testing.assert_close(got["weight_grad"], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("world", [1, 2])
def test_fp16_logits_and_predict(world):
    _check_fp16_and_predict(world, [res["fp16"] for res in _run(world)])


def _check_fp16_and_predict(world: int, results: list) -> None:
    """Every rank's :func:`_fp16_and_predict` against float32 and the full cosine matrix."""
    x, labels, backbone_w, weight = _data(world, FULL_CLASSES)
    full_cos = F.linear(F.normalize((x @ backbone_w.T).float()), F.normalize(weight.float()))
    for r, (losses, ids, cos) in enumerate(results):
        (l32, e32, w32), (l16, e16, w16) = losses[False], losses[True]
        assert l16 == pytest.approx(l32, rel=3e-2)
        torch.testing.assert_close(e16, e32, rtol=0.1, atol=0.1)
        torch.testing.assert_close(w16, w32, rtol=0.1, atol=0.1)
        rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        best = full_cos[rows].max(dim=1).values
        # bfloat16 matmul: near-ties may swap; the chosen class must be within rounding of the best cosine.
        torch.testing.assert_close(cos, best, rtol=0, atol=3e-2)
        assert (full_cos[rows].gather(1, ids.unsqueeze(1)).squeeze(1) >= best - 3e-2).all()


def _rank_distributed_optimizer_step(device: str = "cpu"):
    """One SGD step (momentum, weight decay) of backbone + sampled PartialFC through DistributedOptimizer."""
    import shoal.torch as hvd  # noqa: PLC0415

    me, world = _me_and_world()
    x, labels, backbone_w, weight = (t.to(device) for t in _data(world, SAMPLED_CLASSES))
    mine = slice(me * LOCAL_BATCH, (me + 1) * LOCAL_BATCH)
    backbone = nn.Linear(IN_DIM, DIM, bias=False, dtype=torch.float64, device=device)
    pfc = PartialFC(DIM, SAMPLED_CLASSES, CosFace(s=16.0, m=0.35), sample_rate=SAMPLE_RATE, dtype=torch.float64,
                    device=device)
    with torch.no_grad():
        backbone.weight.copy_(backbone_w)
        pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
    inner = torch.optim.SGD([*backbone.parameters(), *pfc.parameters()], lr=0.5, momentum=0.9, weight_decay=0.01)
    opt = hvd.DistributedOptimizer(inner, named_parameters=[*backbone.named_parameters(prefix="backbone"),
                                                            *pfc.named_parameters(prefix="pfc")])
    pfc.bind_optimizer(opt)  # the wrapper's inner optimizer is the one bound
    pfc(backbone(x[mine]), labels[mine]).backward()
    opt.step()
    return backbone.weight.detach().cpu(), pfc.weight.detach().cpu(), pfc.last_sampled_classes.cpu()


def test_with_distributed_optimizer_one_step_equals_single_process_step():
    _check_optimizer_step(2, run_ranks(_rank_distributed_optimizer_step, world_size=2, timeout_s=60))


def _check_optimizer_step(world: int, results: list) -> None:
    """:func:`_rank_distributed_optimizer_step` on every rank against one single-process SGD step."""
    x, labels, backbone_w, weight = _data(world, SAMPLED_CLASSES)
    sampled = torch.cat([res[2] for res in results])
    margin = CosFace(s=16.0, m=0.35)
    _, _, ref_bb, ref_w = _reference(margin, x, torch.searchsorted(sampled, labels), backbone_w, weight[sampled])
    # First SGD step with momentum: buffer = grad + wd * w; w -= lr * buffer. The sampled rows only (lazy).
    expected_bb = backbone_w - 0.5 * (ref_bb + 0.01 * backbone_w)
    expected_w = weight.clone()
    expected_w[sampled] = weight[sampled] - 0.5 * (ref_w + 0.01 * weight[sampled])
    for res in results:
        torch.testing.assert_close(res[0], expected_bb, rtol=RTOL, atol=ATOL)  # averaged, same on all
    torch.testing.assert_close(torch.cat([res[1] for res in results]), expected_w, rtol=RTOL, atol=ATOL)


def test_bind_refuses_an_optimizer_whose_step_runs_no_hooks():
    class Facade(torch.optim.Optimizer):  # shares state but never ran Optimizer.__init__
        def __init__(self, params):
            self.param_groups = [{"params": list(params)}]
            self.state = {}

        def step(self, closure=None):
            pass

    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25)
    with pytest.raises(ValueError, match="HINT: bind the optimizer it wraps"):
        pfc.bind_optimizer(Facade(pfc.parameters()))


def _rank_unequal_batch():
    me = dist.get_rank()
    pfc = PartialFC(DIM, 11, CosFace())
    n = LOCAL_BATCH - me  # rank 1 has a short batch
    pfc(torch.randn(n, DIM), torch.zeros(n, dtype=torch.long))


def test_unequal_local_batch_raises_naming_ranks_and_sizes():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_unequal_batch, world_size=2, timeout_s=30, pg_timeout_s=10)
    text = str(info.value)
    assert "same local batch size" in text and "rank 0: 4, rank 1: 3" in text and "HINT" in text
    assert all(res.status == "error" for res in info.value.results)


class _Net(nn.Module):
    def __init__(self, num_classes: int = 11):
        super().__init__()
        self.backbone = nn.Linear(IN_DIM, DIM)
        self.head = PartialFC(DIM, num_classes, CosFace())

    def forward(self, x, y):
        return self.head(self.backbone(x), y)


def _rank_ddp():
    torch.manual_seed(0)
    x, y = torch.randn(LOCAL_BATCH, IN_DIM), torch.randint(0, 11, (LOCAL_BATCH,))
    wrong = nn.parallel.DistributedDataParallel(_Net())
    try:
        wrong(x, y)
        raised = ""
    except RuntimeError as exc:
        raised = str(exc)
    net = _Net()
    assert exclude_from_ddp(net) == ["head.weight"]
    right = nn.parallel.DistributedDataParallel(net)
    right(x, y).backward()
    return raised, net.head.weight.grad is not None


def test_inside_ddp_raises_unless_excluded():
    raised, ok = run_ranks(_rank_ddp, world_size=1, timeout_s=30)[0]
    assert "inside a DistributedDataParallel" in raised and "exclude_from_ddp" in raised
    assert ok


def _rank_save(directory: str, num_classes: int):
    pfc = PartialFC(DIM, num_classes, ArcFace(), seed=1)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(dist.get_rank())
    pfc(torch.randn(LOCAL_BATCH, DIM, generator=g), torch.randint(0, num_classes, (LOCAL_BATCH,), generator=g)
        ).backward()
    opt.step()
    pfc.save_sharded(directory, optimizer=opt)
    return pfc.weight.detach().clone(), opt.state[pfc.weight]["momentum_buffer"].clone()


def _rank_load(directory: str, num_classes: int):
    pfc = PartialFC(DIM, num_classes, ArcFace(), seed=2)  # another init: every value must come from the files
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5, momentum=0.9)
    pfc.load_sharded(directory, optimizer=opt)
    # A plain state_dict round trip keeps the layout; another rank's shard is refused.
    pfc.load_state_dict(pfc.state_dict())
    return pfc.weight.detach().clone(), opt.state[pfc.weight]["momentum_buffer"].clone()


def test_checkpoint_saved_on_2_ranks_loads_on_3_and_1(tmp_path):
    num_classes = 20  # 10 + 10 saved; 7 + 7 + 6 loaded: every loading rank straddles a saved boundary
    directory = os.fspath(tmp_path / "ckpt")
    saved = run_ranks(_rank_save, world_size=2, timeout_s=60, args=(directory, num_classes))
    full_w = torch.cat([w for w, _ in saved])
    full_m = torch.cat([m for _, m in saved])
    assert full_m.abs().sum() > 0
    for world in (3, 1):  # a world of one runs here, without a process group
        loaded = run_ranks(_rank_load, world_size=world, timeout_s=60, args=(directory, num_classes)) \
            if world > 1 else [_rank_load(directory, num_classes)]
        assert torch.equal(torch.cat([w for w, _ in loaded]), full_w)
        assert torch.equal(torch.cat([m for _, m in loaded]), full_m)
    assert torch.equal(load_full_weight(directory), full_w)


def test_state_dict_of_another_shard_is_refused(tmp_path):
    # No process group: a world of one owns [0, 11); pretend the state came from rank 1 of 2. The layout
    # rides in the state_dict's metadata (no extra key: insightface's PartialFC_V2 loads it) and survives
    # torch.save/load with weights_only.
    pfc = PartialFC(DIM, 11, CosFace())
    state = pfc.state_dict()
    assert list(state) == ["weight"]
    state._metadata[""]["shoal_partial_fc"] = dict(state._metadata[""]["shoal_partial_fc"], class_start=6,
                                                    class_end=11)
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(RuntimeError, match="owns \\[0, 11\\)"):
        pfc.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    # The former form, with the layout in an "_extra_state" key, still loads and is still checked.
    legacy = {"weight": pfc.weight.detach().clone(), "_extra_state": {"class_start": 0, "class_end": 11,
                                                                      "num_classes": 11}}
    pfc.load_state_dict(legacy)
    legacy["_extra_state"] = {"class_start": 6, "class_end": 11, "num_classes": 11}
    with pytest.raises(RuntimeError, match="owns \\[0, 11\\)"):
        pfc.load_state_dict(legacy)
    # A plain dict with the weight alone (insightface's) loads.
    pfc.load_state_dict({"weight": torch.zeros(11, DIM)})
    assert pfc.weight.abs().sum() == 0


def test_shard_range_is_balanced_and_contiguous():
    for classes, size in [(10, 3), (11, 3), (7, 7), (1_000_000, 8)]:
        ranges = [shard_range(classes, size, r) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_init_does_not_depend_on_world_size():
    full = PartialFC(DIM, 10_000, CosFace(), seed=5).weight.detach()
    # What rank 1 of 3 would initialize, built directly (no process group needed).
    from shoal.parallel.partial_fc import _init_rows

    lo, hi = shard_range(10_000, 3, 1)
    assert torch.equal(_init_rows(lo, hi, DIM, 5, torch.float32), full[lo:hi])


# ------------------------------------------------------------------ sampled rows and the optimizer (1 process)
def _sampled_step(pfc, opt, labels):
    opt.zero_grad()
    pfc(torch.randn(labels.numel(), DIM, dtype=torch.float64), labels).backward()
    used = torch.zeros(pfc.num_local, dtype=torch.bool)
    used[pfc.last_sampled_classes - pfc.class_start] = True
    opt.step()
    return used


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False),
])
def test_bound_optimizer_updates_only_sampled_rows_and_their_state(make_opt):
    torch.manual_seed(0)
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = make_opt(pfc.parameters())
    pfc.bind_optimizer(opt)
    for step in range(3):
        before_w = pfc.weight.detach().clone()
        before_state = {k: v.clone() for k, v in opt.state.get(pfc.weight, {}).items() if v.dim() == 2}
        used = _sampled_step(pfc, opt, torch.tensor([step, 20 + step, 39]))
        assert used.sum() == 10 and used[[step, 20 + step, 39]].all()
        unused = ~used
        assert torch.equal(pfc.weight.detach()[unused], before_w[unused])
        assert not torch.equal(pfc.weight.detach()[used], before_w[used])
        assert pfc.weight.shape == (40, DIM) and pfc.weight.grad.shape == (40, DIM)
        for k, v in opt.state[pfc.weight].items():
            if v.dim() == 2:
                assert v.shape == (40, DIM)
                old = before_state.get(k, torch.zeros_like(v))
                assert torch.equal(v[unused], old[unused]), f"state {k} moved on unused rows"


def test_bound_sgd_matches_dense_sgd_on_the_used_rows():
    torch.manual_seed(1)
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
    pfc.bind_optimizer(opt)
    # Gradient accumulation: two forwards (two samples) then one step updates the union of their rows.
    opt.zero_grad()
    for labels in (torch.tensor([1, 2]), torch.tensor([30, 31])):
        pfc(torch.randn(2, DIM, dtype=torch.float64), labels).backward()
    used, grad, before = pfc._rows_used.clone(), pfc.weight.grad.clone(), pfc.weight.detach().clone()
    opt.step()
    assert 10 < used.sum() <= 20 and used[[1, 2, 30, 31]].all()
    # First SGD step: momentum buffer = grad, w -= lr * grad, on the used rows only.
    torch.testing.assert_close(pfc.weight.detach()[used], before[used] - 0.1 * grad[used], rtol=0, atol=1e-15)
    assert torch.equal(opt.state[pfc.weight]["momentum_buffer"][used], grad[used])
    assert torch.equal(pfc.weight.detach()[~used], before[~used])
    assert pfc._rows_used is None


def test_unbound_optimizer_moves_unused_rows_and_warns():
    # Documents the behavior without bind_optimizer: momentum keeps moving rows that were not sampled.
    torch.manual_seed(2)
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="bind_optimizer"):
        first = _sampled_step(pfc, opt, torch.tensor([0, 1]))
    before = pfc.weight.detach().clone()
    second = _sampled_step(pfc, opt, torch.tensor([2, 3]))
    only_first = first & ~second
    assert only_first.any()
    assert not torch.equal(pfc.weight.detach()[only_first], before[only_first])


def test_eval_mode_uses_every_class():
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64).eval()
    x, y = torch.randn(3, DIM, dtype=torch.float64), torch.tensor([0, 5, 39])
    loss = pfc(x, y)
    ref = F.cross_entropy(CosFace()(F.linear(F.normalize(x), F.normalize(pfc.weight.detach())), y), y)
    torch.testing.assert_close(loss.detach(), ref, rtol=RTOL, atol=ATOL)


def test_bad_labels_and_shapes_raise():
    pfc = PartialFC(DIM, 11, CosFace())
    with pytest.raises(RuntimeError, match="labels in \\[0, 11\\]"):
        pfc(torch.randn(2, DIM), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="expected \\(batch, 8\\)"):
        pfc(torch.randn(2, DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(DIM, 11, CosFace(), sample_rate=0.0)


# ------------------------------------------------- broadcast_parameters / broadcast_optimizer_state skip shards
def _rank_broadcast_keeps_shards(num_classes: int, make_opt: str):
    """The README recipe on a model with a PartialFC head: backbone from rank 0, every rank its own shard."""
    import shoal.torch as hvd  # noqa: PLC0415

    me = dist.get_rank()
    torch.manual_seed(100 + me)  # a different backbone on every rank
    net = _Net(num_classes)
    inner = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if make_opt == "sgd"
             else torch.optim.Adam(net.parameters(), lr=0.01))
    g = torch.Generator().manual_seed(me)
    net(torch.randn(LOCAL_BATCH, IN_DIM, generator=g),
        torch.randint(0, num_classes, (LOCAL_BATCH,), generator=g)).backward()
    inner.step()  # local step: momentum / moments differ on every rank, backbone and shard alike
    shard = net.head.weight.detach().clone()
    shard_state = {k: v.clone() for k, v in inner.state[net.head.weight].items()}
    opt = hvd.DistributedOptimizer(inner, named_parameters=net.named_parameters())
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = {n: {k: v.clone() for k, v in inner.state[p].items()} for n, p in net.named_parameters()}
    return {"shard": shard, "shard_state": shard_state, "weight_after": net.head.weight.detach().clone(),
            "backbone": {k: v.clone() for k, v in net.backbone.state_dict().items()}, "state": state}


@pytest.mark.parametrize("world,num_classes,make_opt", [(2, 10, "sgd"), (3, 11, "adam")],
                         ids=["even-shards-sgd", "uneven-shards-adam"])
def test_broadcast_recipe_keeps_each_ranks_shard_and_its_state(world, num_classes, make_opt):
    results = run_ranks(_rank_broadcast_keeps_shards, world_size=world, timeout_s=90,
                        args=(num_classes, make_opt))
    for r, res in enumerate(results):
        # The shard and its optimizer state are this rank's own, bit for bit.
        assert torch.equal(res["weight_after"], res["shard"])
        assert res["weight_after"].shape[0] == shard_range(num_classes, world, r)[1] - \
            shard_range(num_classes, world, r)[0]
        for k, v in res["shard_state"].items():
            assert torch.equal(res["state"]["head.weight"][k], v), k
        # The backbone and its state are rank 0's.
        for k, v in results[0]["backbone"].items():
            assert torch.equal(res["backbone"][k], v), k
        for name in ("backbone.weight", "backbone.bias"):
            for k, v in results[0]["state"][name].items():
                assert torch.equal(res["state"][name][k], v), (name, k)
    # Rank 0's momentum / first moment was not copied over the others' (their rows differ).
    key = "momentum_buffer" if make_opt == "sgd" else "exp_avg"
    assert not torch.equal(results[0]["shard_state"][key][:3], results[1]["shard_state"][key][:3])


def _rank_broadcast_mismatch():
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.core.errors import MismatchError  # noqa: PLC0415

    me = dist.get_rank()
    messages = []
    model = nn.Sequential(nn.Linear(IN_DIM, DIM + me), nn.Linear(DIM + me, 2))  # rank 1 is wider
    try:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    except MismatchError as exc:
        messages.append(str(exc))
    same = nn.Linear(IN_DIM, DIM)
    groups = [{"params": [same.weight]}, {"params": [same.bias]}] if me else [{"params": same.parameters()}]
    opt = torch.optim.SGD(groups, lr=0.1)
    try:
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    except MismatchError as exc:
        messages.append(str(exc))
    shard = nn.Parameter(torch.zeros(3 + me, DIM))  # uneven shards, but only rank 0 marks its own
    if me == 0:
        mark_no_sync(shard)
    try:
        hvd.broadcast_parameters({"head.weight": shard}, root_rank=0)
    except MismatchError as exc:
        messages.append(str(exc))
    hvd.broadcast_parameters(same.state_dict(), root_rank=0)  # the collectives are still aligned
    return messages


def test_broadcast_of_different_models_names_the_tensor_and_each_ranks_shape():
    results = run_ranks(_rank_broadcast_mismatch, world_size=2, timeout_s=60)
    assert results[0] == results[1] and len(results[0]) == 3  # the same message on every rank
    params_msg, opt_msg, mark_msg = results[0]
    # check_registration's wording: every differing tensor, each rank's dtype, device and shape.
    assert "'0.weight': rank 0: float32 on cpu [8, 6]; rank 1: float32 on cpu [9, 6]" in params_msg
    assert "'0.bias': rank 0: float32 on cpu [8]; rank 1: float32 on cpu [9]" in params_msg
    assert "broadcast_parameters" in params_msg and "HINT" in params_msg and "mark_no_sync" in params_msg
    # Rank 1 put the bias in a second group: the state_dict numbering would pair other parameters.
    assert ("'optimizer parameter 1': rank 0: group 0, float32 on cpu [8]; rank 1: group 1, float32 on cpu [8]"
            in opt_msg)
    assert "broadcast_optimizer_state" in opt_msg and "HINT" in opt_msg
    # A sharded parameter is compared by name only; a mark on some ranks only is named as such.
    assert "'head.weight': rank 0: sharded (not broadcast) []; rank 1: float32 on cpu [4, 8]" in mark_msg
    assert "mark_no_sync" in mark_msg


def test_no_sync_registry_recognizes_state_dict_copies_by_storage():
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    from shoal.parallel import is_no_sync  # noqa: PLC0415

    net = _Net()
    sd = net.state_dict()
    assert not hasattr(sd["head.weight"], "_shoal_no_sync")  # detached: the attribute is gone ...
    assert is_no_sync(sd["head.weight"]) and not is_no_sync(sd["backbone.weight"])  # ... the storage is not
    assert not is_no_sync(sd["head.weight"][1:]) and not is_no_sync(sd["head.weight"].clone())
    net.double()  # new storage, same parameter object: matched where it lives now
    assert is_no_sync(net.state_dict()["head.weight"]) and not is_no_sync(sd["head.weight"])
    alive = weakref.ref(net.head)
    del net, sd
    gc.collect()
    assert alive() is None, "the registry must not keep a module alive"


# ------------------------------------------------------------------ 16-bit weights: sums in float32
FP16_CLASSES = 100_000  # > 65504 (the largest float16) terms of about exp(0) each


def _fp16_many_classes():
    me, world = _me_and_world()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world * LOCAL_BATCH, DIM, generator=g)
    labels = torch.randint(0, FP16_CLASSES, (world * LOCAL_BATCH,), generator=g)
    # s = 0.1: every logit within 0.2 of the row maximum, so each row sums ~90k terms near 1.
    pfc = PartialFC(DIM, FP16_CLASSES, CosFace(s=0.1, m=0.0), dtype=torch.float16)
    e = x[me * LOCAL_BATCH:(me + 1) * LOCAL_BATCH].half().requires_grad_()
    loss = pfc(e, labels[me * LOCAL_BATCH:(me + 1) * LOCAL_BATCH])
    loss.backward()
    return loss.detach(), e.grad, pfc.weight.detach(), x, labels


@pytest.mark.parametrize("world", [1, 2])
def test_fp16_weights_with_more_classes_than_float16_can_count(world):
    """float16 weights: the loss equals a float64 softmax of the same (16-bit) values, finite.

    Tolerance: atol 2e-3 on a loss of log(1e5) ~ 11.5; float16 rounding of the logits (|z| <= 0.1, half-ulp
    ~3e-5) and of each exp (relative 5e-4, unbiased) moves log(sum) by < 1e-4 observed. Summed in float16
    the row sums overflow to inf (65504 is the largest float16).
    """
    results = [_fp16_many_classes()] if world == 1 else run_ranks(_fp16_many_classes, world_size=world,
                                                                   timeout_s=90)
    weight = torch.cat([res[2] for res in results]).double()
    x, labels = results[0][3], results[0][4]
    cos = F.linear(F.normalize(x.half().double()), F.normalize(weight))
    ref = F.cross_entropy(cos * 0.1, labels)
    for loss, emb_grad, *_ in results:
        assert loss.dtype == torch.float16 and torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), ref, rtol=0, atol=2e-3)
        assert torch.isfinite(emb_grad).all()


# ------------------------------------------------------------------ skipped steps, foreign optimizer state
@pytest.mark.parametrize("set_to_none", [True, False])
def test_rows_of_a_skipped_step_are_not_stepped_later(set_to_none):
    """nan_check="skip" and a GradScaler inf step both skip the inner step (no step hook runs): the rows
    sampled for it must not be stepped with the next batch, whose gradient no longer holds them."""
    torch.manual_seed(3)
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    pfc.bind_optimizer(opt)
    _sampled_step(pfc, opt, torch.tensor([0, 1]))  # a real step: momentum everywhere it was used
    opt.zero_grad()
    pfc(torch.randn(2, DIM, dtype=torch.float64), torch.tensor([2, 3])).backward()
    skipped = pfc._rows_used.clone()  # ... and this step is skipped: no opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    before = pfc.weight.detach().clone()
    used = _sampled_step(pfc, opt, torch.tensor([20, 21]))
    only_skipped = skipped & ~used
    assert only_skipped.any()
    assert torch.equal(pfc.weight.detach()[only_skipped], before[only_skipped])
    assert torch.equal(pfc.weight.detach()[~used], before[~used])


def test_gradient_accumulation_still_unions_the_rows():
    torch.manual_seed(4)
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1)
    pfc.bind_optimizer(opt)
    opt.zero_grad(set_to_none=False)
    for labels in (torch.tensor([1, 2]), torch.tensor([30, 31])):
        pfc(torch.randn(2, DIM, dtype=torch.float64), labels).backward()
    assert pfc._rows_used[[1, 2, 30, 31]].all() and pfc._rows_used.sum() > 10


def test_optimizer_state_of_another_shard_shape_is_refused(tmp_path):
    pfc = PartialFC(DIM, 40, CosFace(), sample_rate=0.25, dtype=torch.float64)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
    pfc.bind_optimizer(opt)
    _sampled_step(pfc, opt, torch.tensor([0, 1]))
    # What opt.load_state_dict() of a checkpoint saved by a rank with 30 classes leaves behind.
    opt.state[pfc.weight]["momentum_buffer"] = torch.zeros(30, DIM, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"'momentum_buffer'.*\[30, 8\].*\[40, 8\](.|\n)*HINT: .*load_sharded"):
        _sampled_step(pfc, opt, torch.tensor([2, 3]))
    with pytest.raises(RuntimeError, match="save_sharded on rank 0"):
        pfc.save_sharded(tmp_path / "ckpt", optimizer=opt)


def _rank_save_adam(directory: str, num_classes: int):
    """Two Adam steps (weight decay: every row's state moves), then the shards, optimizer included."""
    pfc = PartialFC(DIM, num_classes, ArcFace(), seed=1)
    opt = torch.optim.Adam(pfc.parameters(), lr=0.01, weight_decay=1e-2)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + dist.get_rank())
        opt.zero_grad()
        pfc(torch.randn(LOCAL_BATCH, DIM, generator=g),
            torch.randint(0, num_classes, (LOCAL_BATCH,), generator=g)).backward()
        opt.step()
    pfc.save_sharded(directory, optimizer=opt)
    return pfc.weight.detach().clone(), {k: v.clone() for k, v in opt.state[pfc.weight].items()}, \
        opt.state_dict()


def _rank_load_adam(directory: str, num_classes: int, stale_state_dict: dict):
    pfc = PartialFC(DIM, num_classes, ArcFace(), seed=2)
    opt = torch.optim.Adam(pfc.parameters(), lr=0.01, weight_decay=1e-2)
    # The documented order: the optimizer's own state_dict first (here: one saved with another shard
    # shape), then load_sharded, which replaces the weight's state with its re-sharded rows.
    opt.load_state_dict(stale_state_dict)
    pfc.load_sharded(directory, optimizer=opt)
    state = {k: v.clone() for k, v in opt.state[pfc.weight].items()}
    g = torch.Generator().manual_seed(99 + dist.get_rank())
    opt.zero_grad()
    pfc(torch.randn(LOCAL_BATCH, DIM, generator=g), torch.randint(0, num_classes, (LOCAL_BATCH,), generator=g)
        ).backward()
    opt.step()  # resumes: the step count continues from the checkpoint
    return pfc.weight.detach().clone(), state, opt.state[pfc.weight]["step"].clone()


def test_adam_checkpoint_saved_on_2_ranks_loads_on_3(tmp_path):
    num_classes = 20
    directory = os.fspath(tmp_path / "ckpt")
    saved = run_ranks(_rank_save_adam, world_size=2, timeout_s=60, args=(directory, num_classes))
    stale = saved[0][2]  # rank 0's opt.state_dict(): a 10-row shard, loaded by ranks of 7, 7 and 6 rows
    loaded = run_ranks(_rank_load_adam, world_size=3, timeout_s=60, args=(directory, num_classes, stale))
    for key in ("exp_avg", "exp_avg_sq"):
        full = torch.cat([s[key] for _, s, _ in saved])
        assert full.abs().sum() > 0
        assert torch.equal(torch.cat([s[key] for _, s, _ in loaded]), full), key
    for r, (_, state, step_after) in enumerate(loaded):
        lo, hi = shard_range(num_classes, 3, r)
        assert state["exp_avg"].shape == (hi - lo, DIM)
        assert torch.is_tensor(state["step"]) and state["step"].dim() == 0 and float(state["step"]) == 2.0
        assert float(step_after) == 3.0


# ------------------------------------------------------------------ global decisions: clipping, GradScaler
CLIP_NORMS = (2.0, 1.0, float("inf"))


def _rank_clip(num_classes: int, max_norm: float):
    """Backbone + PartialFC through DistributedOptimizer; the gradients after shoal's global clipping."""
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.parallel import clip_grad_norm_  # noqa: PLC0415

    me, world = _me_and_world()
    x, labels, backbone_w, weight = _data(world, num_classes)
    mine = slice(me * LOCAL_BATCH, (me + 1) * LOCAL_BATCH)
    backbone = nn.Linear(IN_DIM, DIM, bias=False, dtype=torch.float64)
    pfc = PartialFC(DIM, num_classes, CosFace(s=16.0, m=0.35), dtype=torch.float64)
    with torch.no_grad():
        backbone.weight.copy_(backbone_w)
        pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
    params = [*backbone.parameters(), *pfc.parameters()]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1),
                                   named_parameters=[*backbone.named_parameters(prefix="backbone"),
                                                     *pfc.named_parameters(prefix="pfc")]) if world > 1 else None
    out = {}
    for norm_type in CLIP_NORMS:
        for p in params:
            p.grad = None
        pfc(backbone(x[mine]), labels[mine]).backward()
        if opt is not None:
            opt.synchronize()  # the backbone's gradient, averaged: the documented order
        total = clip_grad_norm_(params, max_norm, norm_type=norm_type)
        out[norm_type] = (total, backbone.weight.grad.clone(), pfc.weight.grad.clone(), pfc.class_start,
                          pfc.class_end)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_clip_grad_norm_equals_torch_on_the_full_single_process_model(world):
    """Reference: torch.nn.utils.clip_grad_norm_ on one process holding the backbone and the whole weight.

    Tolerance (float64): rtol=1e-9, atol=1e-11, as the other references in this file.
    """
    num_classes, max_norm = FULL_CLASSES, 0.05
    results = [_rank_clip(num_classes, max_norm)] if world == 1 else \
        run_ranks(_rank_clip, world_size=world, timeout_s=60, args=(num_classes, max_norm))
    x, labels, backbone_w, weight = _data(world, num_classes)
    margin = CosFace(s=16.0, m=0.35)
    for norm_type in CLIP_NORMS:
        _, _, ref_bb, ref_w = _reference(margin, x, labels, backbone_w, weight)
        # clip_grad_norm_ clips parameters' .grad: attach the reference gradients and clip them.
        ref_bb_p, ref_w_p = nn.Parameter(backbone_w.clone()), nn.Parameter(weight.clone())
        ref_bb_p.grad, ref_w_p.grad = ref_bb.clone(), ref_w.clone()
        ref_total = torch.nn.utils.clip_grad_norm_([ref_bb_p, ref_w_p], max_norm, norm_type=norm_type)
        assert ref_total > 2 * max_norm, "the reference must actually clip"
        for res in results:
            total, bb_grad, w_grad, lo, hi = res[norm_type]
            torch.testing.assert_close(total, ref_total, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(bb_grad, ref_bb_p.grad, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(w_grad, ref_w_p.grad[lo:hi], rtol=RTOL, atol=ATOL)


def _rank_grad_scaler(sync: bool):
    """Rank 1's shard overflows; with sync_grad_scaler_ every rank skips the step, without it only rank 1."""
    import shoal.torch as hvd  # noqa: PLC0415
    from shoal.parallel import sync_grad_scaler_  # noqa: PLC0415

    me = dist.get_rank()
    torch.manual_seed(0)
    net = _Net(10)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                   named_parameters=net.named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = torch.Generator().manual_seed(me)
    before = net.backbone.weight.detach().clone()
    scaler.scale(net(torch.randn(LOCAL_BATCH, IN_DIM, generator=g),
                     torch.randint(0, 10, (LOCAL_BATCH,), generator=g))).backward()
    opt.synchronize()
    if me == 1:
        net.head.weight.grad[0, 0] = float("inf")  # a local overflow: this gradient is never averaged
    scaler.unscale_(opt)
    skipped = sync_grad_scaler_(scaler, opt) if sync else None
    with opt.skip_synchronize():
        scaler.step(opt)
    scaler.update()
    return skipped, scaler.get_scale(), torch.equal(net.backbone.weight.detach(), before)


def test_sync_grad_scaler_skips_the_step_on_every_rank():
    results = run_ranks(_rank_grad_scaler, world_size=2, timeout_s=60, args=(True,))
    assert [r[0] for r in results] == [True, True]
    assert [r[1] for r in results] == [512.0, 512.0]  # the scale backs off alike
    assert [r[2] for r in results] == [True, True]  # the backbone did not move anywhere
    # Without it, rank 0 steps and rank 1 does not: the replicated backbone drifts apart.
    unsynced = run_ranks(_rank_grad_scaler, world_size=2, timeout_s=60, args=(False,))
    assert [r[2] for r in unsynced] == [False, True] and unsynced[0][1] != unsynced[1][1]


def test_sampler_seeds_are_apart_from_the_weight_init_seeds():
    # torch's CPU generator keeps a seed's low 32 bits; init block b of seed s uses s * 1_000_003 + b.
    from shoal.parallel.partial_fc import _sampling_seed  # noqa: PLC0415

    init_seeds = {(s * 1_000_003 + b) % 2**32 for s in range(4) for b in range(1_000)}
    samplers = {_sampling_seed(s, r) for s in range(4) for r in range(64)}
    assert len(samplers) == 4 * 64 and not samplers & init_seeds
    assert all(0 <= x < 2**32 for x in samplers)
