"""shoal.parallel.PartialFC as a drop-in for insightface arcface_torch's ``PartialFC_V2``.

What ``train_v2.py`` does with it, with only its import changed (``from shoal.parallel import PartialFC as
PartialFC_V2``): the construction line ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate,
fp16)``, labels of shape ``(B, 1)``, insightface's own ``CombinedMarginLoss`` (with
``interclass_filtering_threshold``), the per-rank checkpoint and resume code, and ``state_dict()``
loadable both ways with insightface's module at the same world size.

The tests that run insightface's code need a checkout of deepinsight/insightface: set
``COMPAT_INSIGHTFACE_SRC`` to it (or to its ``recognition/arcface_torch``); nothing of it is kept here.
The others run everywhere; the train_v2.py loop runs everywhere too, with Shoal's ``CombinedMargin`` standing
in for insightface's ``CombinedMarginLoss`` where no checkout exists. References: a single process with the whole weight and the concatenated batch
(float64, rtol 1e-9 / atol 1e-11 as in test_partial_fc.py); insightface's margins on the full matrix.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch._dynamo  # noqa: F401  (the first optimizer imports it; see test_partial_fc.py)
import torch.nn.functional as F

from shoal.parallel import ArcFace, CombinedMargin, CosFace, PartialFC
from shoal.testing import run_ranks

RTOL, ATOL = 1e-9, 1e-11
IN_DIM, DIM, LOCAL_BATCH, CLASSES = 6, 8, 4, 11


def _arcface_torch() -> str:
    root = os.environ.get("COMPAT_INSIGHTFACE_SRC", "")
    for path in (os.path.join(root, "recognition", "arcface_torch"), root):
        if root and os.path.exists(os.path.join(path, "partial_fc_v2.py")):
            return path
    return ""


ARCFACE_TORCH = _arcface_torch()
needs_insightface = pytest.mark.skipif(
    not ARCFACE_TORCH, reason="set COMPAT_INSIGHTFACE_SRC to a checkout of deepinsight/insightface")


def _insightface(module: str):
    if ARCFACE_TORCH not in sys.path:
        sys.path.insert(0, ARCFACE_TORCH)
    return __import__(module)


def _data(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = world * LOCAL_BATCH
    x = torch.randn(rows, IN_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (rows,), generator=g)
    labels[0], labels[-1] = 0, CLASSES - 1
    backbone_w = torch.randn(DIM, IN_DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64)
    # Near-duplicate classes: cosines above 0.4 against non-targets, which the filter zeroes.
    weight[labels[1]] = weight[labels[2]] * 1.1 + 0.05 * weight[labels[3]]
    return x, labels, backbone_w, weight


def _reference(margin_fn, x, labels, backbone_w, weight):
    """One process: loss, backbone grad and weight grad with ``margin_fn(cos, labels) -> logits``."""
    bw, w = backbone_w.clone().requires_grad_(), weight.clone().requires_grad_()
    cos = F.linear(F.normalize(x @ bw.T), F.normalize(w))
    loss = F.cross_entropy(margin_fn(cos, labels), labels)
    loss.backward()
    return loss.detach(), bw.grad, w.grad


def _step(margin_kind: str, order: str, labels_2d: bool) -> dict:
    """One step on this rank; returns the loss and the gradients to compare."""
    import shoal.torch as hvd

    me, n = hvd.rank(), hvd.size()
    x, labels, backbone_w, weight = _data(n)
    if margin_kind == "insightface":
        margin = _insightface("losses").CombinedMarginLoss(16.0, 1.0, 0.0, 0.4, 0.4)
    else:
        margin = CombinedMargin(s=16.0, m1=1.0, m2=0.0, m3=0.4, interclass_filtering_threshold=0.4)
    if order == "insightface":  # train_v2.py: PartialFC_V2(margin_loss, embedding_size, num_classes, rate, fp16)
        pfc = PartialFC(margin, DIM, CLASSES, 1.0, False, dtype=torch.float64)
    else:
        pfc = PartialFC(DIM, CLASSES, margin, dtype=torch.float64)
    with torch.no_grad():
        pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
    bw = backbone_w.clone().requires_grad_()
    rows = slice(me * LOCAL_BATCH, (me + 1) * LOCAL_BATCH)
    mine = labels[rows].view(-1, 1) if labels_2d else labels[rows]
    given = mine.clone()
    loss = pfc(x[rows] @ bw.T, mine)
    loss.backward()
    # The embedding gradient is n x that of the global loss (docs/partial_fc.md): average the backbone's.
    bw_grad = hvd.allreduce(bw.grad, op=hvd.Average)
    return {"loss": loss.detach(), "bw": bw_grad, "w": pfc.weight.grad, "range": (pfc.class_start, pfc.class_end),
            "labels_untouched": torch.equal(given, mine) and mine.shape == given.shape}


def _check(results, reference) -> None:
    loss, bw_grad, w_grad = reference
    for r in results:
        torch.testing.assert_close(r["loss"], loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["bw"], bw_grad, rtol=RTOL, atol=ATOL)
        lo, hi = r["range"]
        torch.testing.assert_close(r["w"], w_grad[lo:hi], rtol=RTOL, atol=ATOL)
        assert r["labels_untouched"]


def _shoal_filtered(cos, labels):
    return CombinedMargin(s=16.0, m1=1.0, m2=0.0, m3=0.4, interclass_filtering_threshold=0.4)(cos, labels)


def test_insightface_argument_order_and_labels_of_shape_b_1():
    """train_v2.py's construction line and its (B, 1) labels, with Shoal's margin (filter 0.4)."""
    results = run_ranks(_step, world_size=2, timeout_s=60, args=("shoal", "insightface", True))
    _check(results, _reference(_shoal_filtered, *_data(2)))


def test_constructor_rejects_what_is_neither_order():
    with pytest.raises(TypeError, match="insightface's PartialFC"):
        PartialFC(CosFace(), "8", CLASSES)
    with pytest.raises(TypeError, match="margin_loss"):
        PartialFC(DIM, CLASSES, 0.5)


@needs_insightface
def test_insightface_combined_margin_with_filter_matches_its_full_softmax():
    """insightface's own CombinedMarginLoss(s, 1, 0, 0.4, interclass_filtering_threshold=0.4), which failed
    inside PartialFC before (it needs labels (rows, 1)); reference: the same module on the full matrix."""
    losses = _insightface("losses")

    def full(cos, labels):
        return losses.CombinedMarginLoss(16.0, 1.0, 0.0, 0.4, 0.4)(cos.clamp(-1, 1), labels.view(-1, 1))

    results = run_ranks(_step, world_size=2, timeout_s=60, args=("insightface", "insightface", True))
    _check(results, _reference(full, *_data(2)))
    # Shoal's own CombinedMargin with the filter is the same function, gradients included.
    _check(results, _reference(_shoal_filtered, *_data(2)))


@needs_insightface
def test_straight_through_arcface_equals_insightface_arcface():
    """ArcFace(straight_through=True) against arcface_torch's ArcFace and CombinedMarginLoss(1, m, 0),
    values and gradients, on a full matrix with targets past pi - m (insightface has no fallback)."""
    losses = _insightface("losses")
    g = torch.Generator().manual_seed(3)
    cos = torch.rand(7, 5, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    cos[5, 0] = -0.97
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ours_in = cos.clone().requires_grad_()
    ours = ArcFace(s=16.0, m=0.5, straight_through=True)(ours_in, labels)
    (ours * w).sum().backward()
    for theirs_margin in (losses.ArcFace(16.0, 0.5), losses.CombinedMarginLoss(16.0, 1.0, 0.5, 0.0)):
        theirs_in = cos.clone().requires_grad_()
        theirs = theirs_margin(theirs_in.clamp(-1, 1), labels.view(-1, 1))
        (theirs * w).sum().backward()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)  # acos clamp: 1e-7
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-12)


def _state_dicts_both_ways() -> dict:
    import shoal.torch as hvd

    pfc_v2 = _insightface("partial_fc_v2").PartialFC_V2
    margin = _insightface("losses").CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    torch.manual_seed(hvd.rank())
    theirs = pfc_v2(margin, DIM, CLASSES, 1.0, False)
    ours = PartialFC(margin, DIM, CLASSES, 1.0, False)
    theirs.load_state_dict(ours.state_dict())        # strict: the same keys
    into_theirs = torch.equal(theirs.weight, ours.weight)
    fresh = PartialFC(margin, DIM, CLASSES, 1.0, False, seed=7)
    with torch.no_grad():
        theirs.weight.mul_(2.0)
    fresh.load_state_dict(theirs.state_dict())
    return {"into_theirs": into_theirs, "into_ours": torch.equal(fresh.weight, theirs.weight),
            "same_shard": (theirs.class_start, theirs.num_local) == (ours.class_start, ours.num_local)}


@needs_insightface
def test_state_dict_loads_both_ways_with_insightface_partial_fc_v2():
    for r in run_ranks(_state_dicts_both_ways, world_size=2, timeout_s=60):
        assert r == {"into_theirs": True, "into_ours": True, "same_shard": True}, r


# The values of arcface_torch's configs/wf12m_conflict_r50_pfc03_filter04.py that the loop uses, scaled
# down (embedding 512 -> 8, 1.2M classes -> 11); sample_rate 0.3 in the variant that samples.
MARGIN_LIST, FILTER = (1.0, 0.0, 0.4), 0.4


def _train_v2_loop(output: str, sample_rate: float, margins: str) -> dict:
    """train_v2.py's construction, loop and checkpoint/resume code (CPU, a tiny backbone, synthetic data).

    ``margins``: ``"insightface"`` builds insightface's own ``losses.CombinedMarginLoss`` (the one line
    changed is PartialFC_V2's import); ``"shoal"`` stands Shoal's :class:`CombinedMargin` in for it, with
    the same arguments, where no checkout of insightface exists.
    """
    import torch.distributed as distributed

    if margins == "insightface":
        CombinedMarginLoss = _insightface("losses").CombinedMarginLoss
    else:
        CombinedMarginLoss = CombinedMargin
    from shoal.parallel import PartialFC as PartialFC_V2  # the one line changed

    rank = distributed.get_rank()
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(LOCAL_BATCH, 3, 4, 4, generator=g), torch.randint(0, CLASSES, (LOCAL_BATCH, 1),
                                                                             generator=g)) for _ in range(4)]

    def build():
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.PReLU(),
                                       torch.nn.Linear(16, DIM))
        backbone = torch.nn.parallel.DistributedDataParallel(module=backbone, broadcast_buffers=False,
                                                             bucket_cap_mb=16, find_unused_parameters=True)
        backbone.train()
        margin_loss = CombinedMarginLoss(64, MARGIN_LIST[0], MARGIN_LIST[1], MARGIN_LIST[2], FILTER)
        module_partial_fc = PartialFC_V2(margin_loss, DIM, CLASSES, sample_rate, False)
        module_partial_fc.train()
        opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
                              lr=0.1, momentum=0.9, weight_decay=5e-4)
        # arcface_torch's PolynomialLRWarmup passes verbose=, which torch 2.13's LRScheduler no longer takes
        # (insightface against current torch, whatever the classifier): torch's PolynomialLR stands in.
        lr_scheduler = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10)
        return backbone, module_partial_fc, opt, lr_scheduler

    def train(state, steps):
        backbone, module_partial_fc, opt, lr_scheduler = state
        out = []
        for img, local_labels in steps:
            local_embeddings = backbone(img)
            loss = module_partial_fc(local_embeddings, local_labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
            opt.step()
            opt.zero_grad()
            lr_scheduler.step()
            out.append(loss.item())
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PartialFC's "no optimizer bound" warning (train_v2 binds none)
        first = build()
        losses_before = train(first, batches[:2])
        backbone, module_partial_fc, opt, lr_scheduler = first
        checkpoint = {"epoch": 1, "global_step": 2, "state_dict_backbone": backbone.module.state_dict(),
                      "state_dict_softmax_fc": module_partial_fc.state_dict(), "state_optimizer": opt.state_dict(),
                      "state_lr_scheduler": lr_scheduler.state_dict()}
        torch.save(checkpoint, os.path.join(output, f"checkpoint_gpu_{rank}.pt"))
        resumed = build()
        backbone, module_partial_fc, opt, lr_scheduler = resumed
        dict_checkpoint = torch.load(os.path.join(output, f"checkpoint_gpu_{rank}.pt"))
        backbone.module.load_state_dict(dict_checkpoint["state_dict_backbone"])
        module_partial_fc.load_state_dict(dict_checkpoint["state_dict_softmax_fc"])
        opt.load_state_dict(dict_checkpoint["state_optimizer"])
        lr_scheduler.load_state_dict(dict_checkpoint["state_lr_scheduler"])
        continued, after_resume = train(first, batches[2:]), train(resumed, batches[2:])
    return {"before": losses_before, "continued": continued, "after_resume": after_resume,
            "weight_equal": torch.equal(first[1].weight, resumed[1].weight)}


@pytest.mark.parametrize("margins", [pytest.param("insightface", marks=needs_insightface), "shoal"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_train_v2_construction_and_checkpoint_code_with_only_the_import_changed(tmp_path, sample_rate, margins):
    results = run_ranks(_train_v2_loop, world_size=2, timeout_s=90,
                        args=(os.fspath(tmp_path), sample_rate, margins))
    for r in results:
        assert all(torch.isfinite(torch.tensor(r["before"] + r["continued"]))), r
        assert r["before"] == results[0]["before"], "the loss is the global batch's, the same on every rank"
        if sample_rate == 1.0:  # without sampling the resumed run continues exactly (sampling is random)
            assert r["after_resume"] == r["continued"] and r["weight_equal"], r
