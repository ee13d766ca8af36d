"""Margin losses for face-recognition classifiers: ArcFace, CosFace and the combined (m1, m2, m3) form.

A margin loss turns the cosine similarities between normalized embeddings and normalized class weights
into logits: every logit is scaled by ``s``, and the logit of each row's target class is first replaced by a
penalized value ``phi(cos)``. The same module works on a full ``(rows, classes)`` matrix and on one class
shard of it (:class:`~shoal.parallel.PartialFC`), because targets are given as *column indices into the
tensor passed in*, with ``-1`` for a row whose target class is not among these columns.

What lives elsewhere: the softmax and cross-entropy (sharded in :mod:`shoal.parallel.partial_fc`, or
``torch.nn.functional.cross_entropy`` for a full matrix).

Design constraints:

1. Numerically stable in float16/bfloat16/float32/float64: no ``acos`` or ``sqrt`` is ever evaluated at
   +-1 exactly, where their derivatives are infinite. A matmul of unit vectors can return 1.0000001, so
   inputs are clamped before the angle is taken, never assumed in range; 16-bit targets are upcast to
   float32 first (the clamp bound is not representable in them).
2. ``phi`` must decrease monotonically in the angle, or the margin rewards pushing a sample *away* from
   its class. ``cos(theta + m)`` turns back up once ``theta + m > pi``; past that threshold a fallback is
   used: a constant penalty ``cos(theta) - m sin(pi - m)`` (the rule of the original ArcFace code, which
   insightface's arcface_torch no longer applies: its HEAD computes ``cos(theta + m)`` at every angle), or
   for ``easy_margin`` no penalty when ``cos(theta) <= 0``.
5. Exact gradients by default. insightface's arcface_torch applies the ArcFace margin under
   ``torch.no_grad()``: the forward value is ``cos(theta + m)`` but the backward treats the target logit as
   the plain cosine (a straight-through gradient; the exact slope is ``cos m + sin m cos / sqrt(1 - cos^2)``,
   0.73-1.15 for target cosines in [-0.3, 0.5] at m = 0.5).
   ``ArcFace(straight_through=True)`` reproduces that, with no fallback, for users matching its results.
3. Only the target entries go through the margin (one per row): the work is O(rows), not O(rows x classes),
   so that it is negligible next to the logits matmul of a million-class shard.
4. One pass over the ``(rows, classes)`` matrix each way. Plain autograd through ``logits[rows, cols] =
   phi(cos[rows, cols])`` would add a zero-filled matrix, a clone and an accumulation in the backward
   (measured: a third of the elementwise time of a 500k-class CPU step). So the derivative of ``phi`` is
   taken on the target vector alone (``phi`` is elementwise) and the backward is ``s * grad`` with the
   target entries rescaled by ``phi'``. The caller's cosines are never modified.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["MarginLoss", "ArcFace", "CosFace", "CombinedMargin"]

# Cosines are clamped to [-1 + eps, 1 - eps] before acos. 1e-7 is representable in float32 (rounds to
# 1.19e-7 below 1.0), and bounds |d acos / d cos| by 1/sqrt(1 - (1 - 1e-7)^2) ~ 2.2e3 instead of inf.
_COS_EPS = 1e-7


class MarginLoss(nn.Module):
    """Base class: scale cosine logits by ``s`` and apply ``phi`` to each row's target logit.

    Subclasses implement :meth:`target_logit` (the unscaled ``phi(cos)``).

    Args:
        s: scale (inverse temperature) applied to every logit.
        interclass_filtering_threshold: insightface's filter of conflicting identities: when > 0, every
            non-target cosine above it is set to 0 (and gets no gradient) before the margin, so that a
            near-duplicate class does not push back on the sample (insightface's ``wf12m_*filter04``
            configs use 0.4). 0 (the default) filters nothing.
    """

    def __init__(self, s: float, interclass_filtering_threshold: float = 0.0):
        super().__init__()
        if s <= 0:
            raise ValueError(f"shoal: margin scale s must be positive, got {s}. HINT: 64 is the usual value.")
        if not 0.0 <= interclass_filtering_threshold <= 1.0:
            raise ValueError(f"shoal: interclass_filtering_threshold={interclass_filtering_threshold} must be in "
                             "[0, 1] (a cosine; 0 turns the filter off). HINT: insightface's configs use 0.4.")
        self.s = float(s)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)

    def target_logit(self, cos: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Unscaled penalized logit ``phi(cos)`` for a 1-D tensor of target cosines; must be elementwise."""
        raise NotImplementedError

    def forward(self, cos: Tensor, targets: Tensor) -> Tensor:
        """Scaled logits with the margin applied to each row's target column.

        Args:
            cos: ``(rows, columns)`` cosine similarities, in [-1, 1] up to rounding.
            targets: ``(rows,)`` integer column of each row's target class in ``cos``, or ``-1`` where the
                target is not among these columns (another shard holds it).

        Returns:
            ``(rows, columns)`` logits: ``s * cos`` everywhere, ``s * phi(cos)`` at the targets.

        Example:
            >>> margin = ArcFace(s=64.0, m=0.5)
            >>> logits = margin(F.linear(F.normalize(x), F.normalize(w)), labels)
            >>> loss = F.cross_entropy(logits, labels)
        """
        if targets.shape != cos.shape[:1]:
            raise ValueError(f"shoal: margin targets have shape {tuple(targets.shape)}, expected "
                             f"({cos.shape[0]},) for cosines of shape {tuple(cos.shape)}. "
                             "HINT: pass one target column per row, -1 for rows without a target here.")
        rows = torch.nonzero(targets >= 0).squeeze(1)
        if self.interclass_filtering_threshold > 0:
            keep = cos <= self.interclass_filtering_threshold
            keep[rows, targets[rows]] = True  # the target is never filtered
            cos = cos * keep
        return _ApplyTargetMargin.apply(cos, rows, targets[rows], self)

    def extra_repr(self) -> str:
        return f"s={self.s:g}" + self._filter_repr()

    def _filter_repr(self) -> str:
        thr = self.interclass_filtering_threshold
        return f", interclass_filtering_threshold={thr:g}" if thr > 0 else ""


class _ApplyTargetMargin(torch.autograd.Function):
    """``s * cos`` with ``s * phi(cos)`` at ``(rows, cols)``; backward in one pass (constraint 4)."""

    @staticmethod
    def forward(ctx, cos: Tensor, rows: Tensor, cols: Tensor, margin: "MarginLoss") -> Tensor:
        logits = cos * margin.s
        slope = None
        if rows.numel():
            target = cos[rows, cols].detach()
            if target.element_size() < 4:
                # 1 - 1e-7 rounds to 1.0 in float16/bfloat16, where sqrt/acos have infinite slopes.
                target = target.float()
            with torch.enable_grad():
                target.requires_grad_()
                phi = margin.target_logit(target)
                # phi is elementwise: the gradient of its sum is its derivative at every target.
                (slope,) = torch.autograd.grad(phi.sum(), target, allow_unused=True)
            if slope is None:  # phi does not depend on the cosine
                slope = torch.zeros_like(target)
            logits.index_put_((rows, cols), (phi.detach() * margin.s).to(logits.dtype))
            slope = (slope * margin.s).to(cos.dtype)
        ctx.save_for_backward(rows, cols, slope if slope is not None else cos.new_empty(0))
        ctx.scale = margin.s
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, cols, slope = ctx.saved_tensors
        out = grad * ctx.scale
        if rows.numel():
            out.index_put_((rows, cols), grad[rows, cols] * slope)
        return out, None, None, None


def _angle(cos: Tensor) -> Tensor:
    return torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))


class ArcFace(MarginLoss):
    """Additive angular margin: ``phi = cos(theta + m)`` (Deng et al., ArcFace).

    Past ``theta = pi - m`` (where ``cos(theta + m)`` stops decreasing) the target logit is
    ``cos(theta) - m * sin(pi - m)``, the original ArcFace code's fallback (constraint 2); with
    ``easy_margin=True`` the margin is applied only where ``cos(theta) > 0`` and the raw cosine is kept
    elsewhere.

    Args:
        s: logit scale. m: angular margin in radians. easy_margin: see above.
        straight_through: insightface arcface_torch's variant (constraint 5): ``cos(theta + m)`` at every
            angle (no fallback) in the forward, the plain cosine's gradient in the backward. For
            reproducing its results; the default is the exact gradient.
        interclass_filtering_threshold: see :class:`MarginLoss`.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, straight_through: bool = False,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold)
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"shoal: ArcFace margin m={m} must be in [0, pi/2). HINT: 0.5 is the usual value.")
        if straight_through and easy_margin:
            raise ValueError("shoal: ArcFace(straight_through=True) reproduces insightface's margin, which has no "
                             "easy_margin. HINT: pass one of them.")
        self.m = float(m)
        self.easy_margin = bool(easy_margin)
        self.straight_through = bool(straight_through)
        self._cos_m, self._sin_m = math.cos(m), math.sin(m)
        self._threshold = math.cos(math.pi - m)
        self._fallback_penalty = math.sin(math.pi - m) * m

    def target_logit(self, cos: Tensor) -> Tensor:
        if self.straight_through:
            # The value of cos(theta + m) at every angle, the slope of the identity (insightface's no_grad).
            return cos + (torch.cos(_angle(cos) + self.m) - cos).detach()
        c = cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
        # cos(t + m) = cos t cos m - sin t sin m; sin t >= 0 on [0, pi]. The clamp keeps sqrt off 0.
        phi = c * self._cos_m - torch.sqrt(1.0 - c * c) * self._sin_m
        if self.easy_margin:
            return torch.where(cos > 0, phi, cos)
        return torch.where(cos > self._threshold, phi, cos - self._fallback_penalty)

    def extra_repr(self) -> str:
        extra = ", straight_through=True" if self.straight_through else ""
        return f"s={self.s:g}, m={self.m:g}, easy_margin={self.easy_margin}{extra}" + self._filter_repr()


class CosFace(MarginLoss):
    """Additive cosine margin: ``phi = cos(theta) - m`` (Wang et al., CosFace / AM-softmax).

    Monotone everywhere and free of ``acos``, so no threshold is needed.

    Args:
        s: logit scale. m: cosine margin.
    """

    def __init__(self, s: float = 64.0, m: float = 0.4, interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold)
        if m < 0:
            raise ValueError(f"shoal: CosFace margin m={m} must be >= 0. HINT: 0.4 is the usual value.")
        self.m = float(m)

    def target_logit(self, cos: Tensor) -> Tensor:
        return cos - self.m

    def extra_repr(self) -> str:
        return f"s={self.s:g}, m={self.m:g}" + self._filter_repr()


class CombinedMargin(MarginLoss):
    """The combined margin of insightface: ``phi = cos(m1 * theta + m2) - m3``.

    ``(1, m, 0)`` is ArcFace, ``(1, 0, m)`` is CosFace, ``m1 > 1`` adds SphereFace's multiplicative margin;
    ``(1.0, 0.3, 0.2)`` is the combined margin of the original insightface (MXNet) code. insightface's
    arcface_torch ``CombinedMarginLoss`` differs: it computes ArcFace for ``m1 = 1, m3 = 0`` and otherwise
    CosFace with ``m3`` alone, so there ``(1.0, 0.3, 0.2)`` means CosFace 0.2 (pass that module itself to
    PartialFC to reproduce it). Where ``m1 * theta + m2`` passes ``pi`` (the angle
    ``theta* = (pi - m2) / m1``), ``phi`` falls back to ``cos(theta) - m3 - sin(theta*) (pi - theta*)``,
    which for ``m1 = 1`` is exactly ArcFace's fallback, so ``CombinedMargin(s, 1, m, 0)`` equals
    ``ArcFace(s, m)`` everywhere.

    Args:
        s: logit scale. m1: multiplicative angular margin (>= 1). m2: additive angular margin (radians).
        m3: additive cosine margin.
        interclass_filtering_threshold: see :class:`MarginLoss` (insightface's
            ``CombinedMarginLoss(..., interclass_filtering_threshold)``).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold)
        if m1 < 1.0 or m2 < 0.0 or m3 < 0.0 or m2 >= math.pi:
            raise ValueError(f"shoal: CombinedMargin needs m1 >= 1, 0 <= m2 < pi, m3 >= 0; got "
                             f"m1={m1}, m2={m2}, m3={m3}. HINT: (1.0, 0.5, 0.0) is ArcFace, (1.0, 0.0, 0.4) CosFace.")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        theta_star = (math.pi - m2) / m1
        self._pure_cosine = m1 == 1.0 and m2 == 0.0
        self._threshold = math.cos(theta_star)
        self._fallback_penalty = m3 + math.sin(theta_star) * (math.pi - theta_star)

    def target_logit(self, cos: Tensor) -> Tensor:
        if self._pure_cosine:
            return cos - self.m3
        phi = torch.cos(self.m1 * _angle(cos) + self.m2) - self.m3
        return torch.where(cos > self._threshold, phi, cos - self._fallback_penalty)

    def extra_repr(self) -> str:
        return f"s={self.s:g}, m1={self.m1:g}, m2={self.m2:g}, m3={self.m3:g}" + self._filter_repr()
