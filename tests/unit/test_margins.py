"""Margin losses: formulas against math, monotonicity, stability at the edges of [-1, 1], equivalences."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.parallel import ArcFace, CombinedMargin, CosFace

ANGLES = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
# Cosines within 1e-7 of +-1 are clamped (angle 4.5e-4 rad from 0 or pi); formulas are checked beyond.
INSIDE = ANGLES[1:-1]


def test_arcface_is_cos_of_angle_plus_margin_below_the_threshold():
    m = 0.5
    theta = INSIDE[INSIDE < math.pi - m - 1e-3]
    got = ArcFace(m=m).target_logit(torch.cos(theta))
    torch.testing.assert_close(got, torch.cos(theta + m), rtol=0, atol=1e-12)


def test_arcface_fallback_past_the_threshold_is_the_constant_penalty():
    m = 0.5
    theta = ANGLES[ANGLES > math.pi - m + 1e-3]
    got = ArcFace(m=m).target_logit(torch.cos(theta))
    torch.testing.assert_close(got, torch.cos(theta) - m * math.sin(math.pi - m), rtol=0, atol=1e-12)


def test_easy_margin_keeps_negative_cosines():
    cos = torch.tensor([-0.9, -0.1, 0.2, 0.9], dtype=torch.float64)
    got = ArcFace(m=0.5, easy_margin=True).target_logit(cos)
    torch.testing.assert_close(got[:2], cos[:2])
    torch.testing.assert_close(got[2:], torch.cos(torch.acos(cos[2:]) + 0.5))


def test_cosface_subtracts_the_margin():
    cos = torch.linspace(-1, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(CosFace(m=0.35).target_logit(cos), cos - 0.35)


@pytest.mark.parametrize("margin", [ArcFace(m=0.5), CosFace(m=0.4), CombinedMargin(m1=1.0, m2=0.3, m3=0.2),
                                    CombinedMargin(m1=1.35, m2=0.25, m3=0.1)],
                         ids=["arcface", "cosface", "combined", "combined-m1"])
def test_target_logit_decreases_with_the_angle_and_penalizes(margin):
    cos = torch.cos(ANGLES)
    phi = margin.target_logit(cos)
    assert (phi[1:] <= phi[:-1] + 1e-12).all(), "phi must not increase with the angle"
    assert (phi <= cos + 1e-12).all(), "a margin must never raise the target logit"


def test_combined_reduces_to_arcface_and_cosface():
    cos = torch.cos(ANGLES)
    torch.testing.assert_close(CombinedMargin(m1=1.0, m2=0.5, m3=0.0).target_logit(cos),
                               ArcFace(m=0.5).target_logit(cos), rtol=0, atol=1e-12)
    torch.testing.assert_close(CombinedMargin(m1=1.0, m2=0.0, m3=0.4).target_logit(cos),
                               CosFace(m=0.4).target_logit(cos), rtol=0, atol=0)


def test_combined_formula_in_the_regular_region():
    theta = INSIDE[INSIDE < 1.5]
    got = CombinedMargin(m1=1.2, m2=0.3, m3=0.2).target_logit(torch.cos(theta))
    torch.testing.assert_close(got, torch.cos(1.2 * theta + 0.3) - 0.2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(), ArcFace(easy_margin=True)],
                         ids=["arcface", "cosface", "combined", "arcface-easy"])
def test_finite_values_and_gradients_at_and_beyond_plus_minus_one(margin, dtype):
    # A matmul of unit vectors can return 1 + ulp; acos/sqrt must never see it.
    edge = [-1.0 - 1e-6, -1.0, -1.0 + 1e-9, 0.0, 1.0 - 1e-9, 1.0, 1.0 + 1e-6]
    cos = torch.tensor([edge, edge], dtype=dtype).t().contiguous().requires_grad_()
    targets = torch.zeros(len(edge), dtype=torch.long)
    logits = margin(cos, targets)
    logits.sum().backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cos.grad).all()


def test_forward_scales_all_and_margins_only_targets():
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0, -1, 2])  # row 1: target on another shard
    got = CosFace(s=10.0, m=0.25)(cos, targets)
    expected = cos * 10.0
    expected[0, 0] = (0.5 - 0.25) * 10.0
    expected[2, 2] = (0.1 - 0.25) * 10.0
    torch.testing.assert_close(got, expected)
    assert cos[0, 0] == 0.5, "the input must not be modified"


def test_invalid_parameters_raise_with_a_hint():
    with pytest.raises(ValueError, match="HINT"):
        ArcFace(m=2.0)
    with pytest.raises(ValueError, match="HINT"):
        CosFace(m=-0.1)
    with pytest.raises(ValueError, match="HINT"):
        CombinedMargin(m1=0.5)
    with pytest.raises(ValueError, match="HINT"):
        CosFace(s=0)
    with pytest.raises(ValueError, match="HINT"):
        CosFace()(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def _plain_autograd_logits(margin, cos, targets):
    """The margin written with plain autograd ops: the reference for the fused backward."""
    rows = torch.nonzero(targets >= 0).squeeze(1)
    cols = targets[rows]
    return (cos * margin.s).index_put((rows, cols), margin.target_logit(cos[rows, cols]) * margin.s)


@pytest.mark.parametrize("margin", [ArcFace(s=8.0), CosFace(s=8.0), CombinedMargin(s=8.0),
                                    CombinedMargin(s=8.0, m1=1.35, m2=0.25, m3=0.1), ArcFace(s=8.0, easy_margin=True)],
                         ids=["arcface", "cosface", "combined", "combined-m1", "arcface-easy"])
def test_fused_backward_equals_plain_autograd_and_gradcheck(margin):
    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.98 - 0.99).requires_grad_()
    targets = torch.tensor([0, 4, -1, 2, 2, -1])
    upstream = torch.randn(6, 5, generator=g, dtype=torch.float64)
    fused = torch.autograd.grad(margin(cos, targets), cos, upstream)[0]
    plain = torch.autograd.grad(_plain_autograd_logits(margin, cos, targets), cos, upstream)[0]
    # float64, same formulas: only summation order differs.
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda c: margin(c, targets), (cos,))


# ------------------------------------------------------------------ insightface arcface_torch's variants
def _plain(margin, cos, targets):
    """The margin in plain autograd ops on a full matrix (no fused backward)."""
    rows = torch.arange(cos.shape[0])
    return (cos * margin.s).index_put((rows, targets), margin.target_logit(cos[rows, targets]) * margin.s)


def test_straight_through_arcface_has_insightface_value_and_the_cosine_gradient():
    """insightface HEAD: cos(theta + m) at every angle in the forward (no fallback), computed under
    no_grad, so the target logit's gradient is that of s * cos."""
    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    targets = torch.tensor([0, 3, 6, 2, 2])
    cos.data[4, 2] = -0.95  # past pi - m: insightface has no fallback there
    st = ArcFace(s=8.0, m=0.5, straight_through=True)
    logits = st(cos, targets)
    rows = torch.arange(5)
    expect = (cos.detach() * 8.0).index_put((rows, targets), torch.cos(torch.acos(cos.detach()[rows, targets]) + 0.5) * 8.0)
    torch.testing.assert_close(logits.detach(), expect, rtol=0, atol=1e-9)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (logits * w).sum().backward()
    torch.testing.assert_close(cos.grad, w * 8.0, rtol=0, atol=1e-12)
    # The exact default differs on the target entries (the point of the option).
    cos.grad = None
    (ArcFace(s=8.0, m=0.5)(cos, targets) * w).sum().backward()
    assert not torch.allclose(cos.grad[rows, targets], (w * 8.0)[rows, targets])


@pytest.mark.parametrize("margin", [CombinedMargin(s=8.0, m1=1.0, m2=0.0, m3=0.4, interclass_filtering_threshold=0.4),
                                    ArcFace(s=8.0, m=0.5, interclass_filtering_threshold=0.3)],
                         ids=["cosface-0.4", "arcface-0.3"])
def test_interclass_filtering_zeroes_non_target_cosines_above_the_threshold(margin):
    """insightface's CombinedMarginLoss(..., interclass_filtering_threshold): every non-target cosine above
    the threshold becomes 0 (value and gradient); targets and rows without a target here (-1) as stated."""
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    targets = torch.tensor([0, 4, -1, 8, 4, -1])
    cos.data[1, 4] = 0.9  # a target above the threshold: never filtered
    thr = margin.interclass_filtering_threshold
    keep = cos.detach() <= thr
    here = targets >= 0
    keep[torch.arange(6)[here], targets[here]] = True
    filtered = (cos * keep).detach().requires_grad_()
    rows = torch.nonzero(here).squeeze(1)
    expect = (filtered * margin.s).index_put((rows, targets[rows]), margin.target_logit(filtered[rows, targets[rows]]) * margin.s)
    got = margin(cos, targets)
    torch.testing.assert_close(got, expect.detach(), rtol=0, atol=1e-12)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    (got * w).sum().backward()
    assert (cos.grad[~keep] == 0).all() and (cos.grad[keep] != 0).all()
    assert "interclass_filtering_threshold" in repr(margin)


def test_filtering_and_straight_through_arguments_are_checked():
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        CosFace(interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="easy_margin"):
        ArcFace(straight_through=True, easy_margin=True)
