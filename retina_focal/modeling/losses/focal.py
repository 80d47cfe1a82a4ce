"""The focal loss (§3, eq. 5) and its family: FL* (Appendix A), α-balanced CE (γ = 0).

Two forms of the same loss, side by side:

* :func:`sigmoid_focal_loss`, the readable one: eq. 5 elementwise on (M, K) logits and
  one-hot targets, in log space (fvcore's signature); :func:`sigmoid_focal_loss_star` is
  FL* in the same style;
* :func:`focal_loss_sum`, the one :class:`FocalLoss` trains with: the same sum over the
  non-ignored anchors, computed from the anchor labels with its gradient in the same pass
  (Appendix B's derivative), no one-hot target, one saved tensor. ``tests/modeling/losses/test_focal.py``
  checks that it equals the readable form (value and gradient, in float64, to 1e-12).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from torch import Tensor, nn
from torch.nn import functional as F

from retina_focal.modeling.losses.registry import RETINA_FOCAL_LOSS_REGISTRY

__all__ = [
    "FocalLoss",
    "FocalLossStar",
    "class_balanced_alpha",
    "focal_loss_sum",
    "focal_loss_sum_and_grad",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "valid_logits_and_targets",
]

_REDUCTIONS = ("none", "mean", "sum")

# α: one float for all classes (< 0: no weighting), or one value in [0, 1] per class (K,)
Alpha = Union[float, Tensor]


def _signed_logits(inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """x_t = y·x with y = ±1 (Appendix A, eq. 6), and the targets, both in at least float32.

    Half/bfloat16 inputs are computed in float32 (AMP-safe); float64 stays float64.
    """
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    targets = targets.to(dtype)
    return inputs.to(dtype) * (2.0 * targets - 1.0), targets


def _alpha_weighted(loss: Tensor, targets: Tensor, alpha: Alpha) -> Tensor:
    """α_t·loss (eq. 3): α for the positives, 1 - α for the negatives.

    ``alpha`` is a float (< 0: returned unweighted) or a tensor broadcastable over the
    last dim, e.g. (K,) with one α per class column.
    """
    if isinstance(alpha, Tensor):
        alpha = alpha.to(loss)
    elif alpha < 0:
        return loss
    return loss * (alpha * targets + (1 - alpha) * (1 - targets))


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """FL(p_t) = -α_t (1 - p_t)^γ log(p_t) (eq. 5), elementwise on sigmoid outputs.

    Same signature and semantics as ``fvcore.nn.sigmoid_focal_loss`` (except the default
    ``alpha``: 0.25 here, the paper's and torchvision's; -1 in fvcore), but computed from
    x_t = ±x in log space: log(p_t) = logsigmoid(x_t) and (1 - p_t)^γ =
    exp(γ·logsigmoid(-x_t)). No log(sigmoid(x)) is ever formed, so loss and gradient are
    finite for every finite logit and every γ ≥ 0 (fvcore's gradient is NaN for γ < 1 once
    the sigmoid saturates).

    Args:
        inputs (Tensor): logits of any shape; half/bfloat16 are computed in float32, float64
            stays float64.
        targets (Tensor): same shape, binary labels in {0, 1}.
        alpha (float or Tensor): weight α of the positives in [0, 1], negatives get 1 - α;
            a float < 0 disables the weighting. A tensor broadcastable over the last dim,
            e.g. (K,), gives one α per class column (values in [0, 1]).
        gamma (float): focusing parameter γ ≥ 0; γ = 0 gives α-balanced CE (eq. 3).
        reduction (str): "none" | "mean" | "sum".

    Returns:
        Tensor: the loss with ``reduction`` applied, float32 (float64 for float64 inputs).
    """
    _check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    x_t, targets = _signed_logits(inputs, targets)
    loss = -F.logsigmoid(x_t)  # CE = -log(p_t)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-x_t))  # (1 - p_t)^γ
    return _reduce(_alpha_weighted(loss, targets, alpha), reduction)


def sigmoid_focal_loss_star(
    inputs: Tensor,
    targets: Tensor,
    alpha: Alpha = 0.25,
    gamma: float = 2.0,
    beta: float = 1.0,
    reduction: str = "none",
) -> Tensor:
    """FL* = -α_t log(p_t*) / γ with p_t* = σ(γ x_t + β) (Appendix A, eqs. 6-8), elementwise.

    -log σ(z) is evaluated as -logsigmoid(z) = softplus(-z), so loss and gradient
    (dFL*/dx = y (p_t* - 1), eq. 11, times α_t) are finite for every finite logit.
    γ = 1, β = 0 gives the cross entropy; γ = 2, β = 1 and γ = 4, β = 0 are the settings of
    Fig. 5 and Table 3 (with α = .25, as in all Appendix A experiments).

    Args:
        inputs (Tensor): logits of any shape (half/bfloat16 computed in float32).
        targets (Tensor): same shape, binary labels in {0, 1}.
        alpha (float or Tensor): as in :func:`sigmoid_focal_loss`.
        gamma (float): steepness γ > 0.
        beta (float): shift β, any finite value.
        reduction (str): "none" | "mean" | "sum".

    Returns:
        Tensor: the loss with ``reduction`` applied, float32 (float64 for float64 inputs).
    """
    _check_reduction(reduction)
    if not gamma > 0:
        raise ValueError(f"focal loss* gamma must be > 0, got {gamma}")
    x_t, targets = _signed_logits(inputs, targets)
    loss = -F.logsigmoid(gamma * x_t + beta) / gamma  # -log(p_t*) / γ
    return _reduce(_alpha_weighted(loss, targets, alpha), reduction)


def _class_weights(alpha: Alpha, like: Tensor) -> Tuple[Union[float, Tensor], Union[float, Tensor]]:
    """(weight of the positives, weight of the negatives): (α, 1 - α) of eq. 3, as floats or
    (K,) tensors on ``like``'s device; (1, 1) when a float α < 0 turns the weighting off."""
    if isinstance(alpha, Tensor):
        alpha = alpha.to(like)
        return alpha, 1 - alpha
    return (1.0, 1.0) if alpha < 0 else (alpha, 1.0 - alpha)


def _at(weight: Union[float, Tensor], classes: Tensor) -> Union[float, Tensor]:
    """A class weight for each of ``classes`` (the float itself when it is one)."""
    return weight[classes] if isinstance(weight, Tensor) else weight


def _focal_term(x_t: Tensor, gamma: float) -> Tuple[Tensor, Tensor]:
    """(1 - p_t)^γ·(-log p_t) and its derivative in x_t, unweighted, with p_t = σ(x_t).

    With s = 1 - p_t = σ(-x_t) and L = -log p_t = softplus(-x_t): FL = s^γ L and
    dFL/dx_t = -s^γ (γ (1 - s) L + s) (Appendix B).
    """
    s = torch.sigmoid(-x_t)
    ce = F.softplus(-x_t)
    s_pow = s.pow(gamma)
    return s_pow * ce, -s_pow * torch.addcmul(s, torch.sigmoid(x_t), ce, value=gamma)


def _negative_cross_entropy(x: Tensor, sig: Tensor) -> Tensor:
    """softplus(x) = -log(1 - σ(x)), the CE of a negative, from σ = σ(x), as
    relu(x) - log(max(σ, 1 - σ)): the log only sees [0.5, 1] (no cancellation), and one log
    replaces softplus's exp and log1p, the slowest step of the loss on a CPU. New (M, K) buffer."""
    ce = torch.sub(1.0, sig)
    return torch.maximum(ce, sig, out=ce).log_().neg_().add_(x.clamp(min=0))


@torch.no_grad()
def focal_loss_sum_and_grad(
    logits: Tensor, gt_labels: Tensor, alpha: Alpha, gamma: float, scale: float = 1.0
) -> Tuple[Tensor, Tensor]:
    """scale · Σ FL over the non-ignored anchors, and its gradient, in one pass with no one-hot
    target. Every element is first scored as a negative (x_t = -x):
    FL = (1 - α) σ(x)^γ softplus(x), dFL/dx = (1 - α) σ(x)^γ (γ (1 - σ(x)) softplus(x) + σ(x))
    (Appendix B with y = -1); then the positives (one column per foreground anchor, ~0.1 %
    of the elements) are corrected by index. Three (M, K) buffers; the gradient reuses one.

    Args:
        logits (Tensor): (..., K), any float dtype (computed in at least float32).
        gt_labels (Tensor): (...) in {-1 (ignored), 0..K-1 (class), K (background)}.
        alpha, gamma: as in :func:`sigmoid_focal_loss`.
        scale (float): multiplies loss and gradient (e.g. 1 / the §4.1 normalizer).

    Returns:
        (Tensor, Tensor): the scalar loss and its gradient with respect to ``logits`` (same
        shape), both in the computation dtype: float32 (float64 for float64 logits). The
        gradient is not rounded to a half dtype here: under AMP it is multiplied by the
        GradScaler's scale (e.g. 65536, above float16's max 65504) before it may be cast.
    """
    num_classes = logits.shape[-1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, num_classes)  # (M, K)
    labels = gt_labels.reshape(-1)  # (M,)
    pos_weight, neg_weight = _class_weights(alpha, x)

    sig = torch.sigmoid(x)  # (M, K)
    focus = sig * sig if gamma == 2 else sig.pow(gamma)  # (M, K) σ(x)^γ = (1 - p_t)^γ
    ignored = labels < 0
    if ignored.any():
        focus.mul_(~ignored.unsqueeze(1))  # ignored anchors: no loss, no gradient
    elementwise = _negative_cross_entropy(x, sig).mul_(focus)  # (M, K) σ^γ softplus(x)
    if isinstance(neg_weight, Tensor):
        loss = (elementwise.sum(0) * neg_weight).sum()  # not dot: autocast would run it in half precision
    else:
        loss = elementwise.sum() * neg_weight
    # gradient: σ^γ·σ + γ (1 - σ)·σ^γ softplus, in the buffers of focus and elementwise
    grad = focus.mul_(sig).add_(elementwise.addcmul_(elementwise, sig, value=-1.0), alpha=gamma)
    grad.mul_(neg_weight * scale)

    rows = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)  # (P,) foreground
    classes = labels[rows]
    x_pos = x[rows, classes]  # (P,)
    pos_loss, pos_grad = _focal_term(x_pos, gamma)
    counted_as_negative, _ = _focal_term(-x_pos, gamma)
    loss = loss + (_at(pos_weight, classes) * pos_loss).sum() - (_at(neg_weight, classes) * counted_as_negative).sum()
    grad[rows, classes] = _at(pos_weight, classes) * pos_grad * scale
    return loss * scale, grad.reshape(logits.shape)


class _FocalLossSum(torch.autograd.Function):
    """scale · Σ FL with the gradient computed in the forward pass; the backward hands it on,
    times the incoming gradient (e.g. a GradScaler's scale) in the computation dtype, and casts
    it to the logits' dtype once, last: a float16 gradient neither overflows at scale 65536
    nor loses its small entries to rounding before the scale. First order only: a backward
    with ``create_graph=True`` raises."""

    @staticmethod
    def forward(ctx, logits: Tensor, gt_labels: Tensor, alpha: Alpha, gamma: float, scale: float) -> Tensor:
        loss, grad = focal_loss_sum_and_grad(logits, gt_labels, alpha, gamma, scale)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # backward with create_graph=True
            raise RuntimeError(
                "focal_loss_sum (FocalLoss) is differentiable once only: its gradient is computed in the "
                "forward pass (Appendix B) and has no graph. For higher-order derivatives use "
                "sigmoid_focal_loss (FocalLoss.elementwise_loss)."
            )
        (grad,) = ctx.saved_tensors
        if not bool(grad_output == 1):  # 1 when the loss is summed with others and backpropagated
            grad = grad * grad_output.to(grad.dtype)
        return grad.to(ctx.logits_dtype), None, None, None, None


def focal_loss_sum(
    logits: Tensor, gt_labels: Tensor, alpha: Alpha = 0.25, gamma: float = 2.0, scale: float = 1.0
) -> Tensor:
    """scale · Σ FL (eq. 5) over all non-ignored anchors, from anchor labels (no one-hot target).

    Equal to ``scale * sigmoid_focal_loss(*valid_logits_and_targets(logits, gt_labels), alpha,
    gamma, "sum")`` to float rounding, about 5× faster on a CPU and with a fraction of its
    memory: loss and gradient come from one pass (:func:`focal_loss_sum_and_grad`) and only
    the gradient is kept for the backward. Differentiable in ``logits`` (first order).

    Args:
        logits (Tensor): (..., K), e.g. (N, R, K); half/bfloat16 computed in float32.
        gt_labels (Tensor): (...) int64 in {-1 (ignored), 0..K-1 (class), K (background)}.
        alpha, gamma: as in :func:`sigmoid_focal_loss`.
        scale (float): multiplies the loss, e.g. 1 / the §4.1 normalizer.

    Returns:
        Tensor: scalar, float32 (float64 for float64 logits).
    """
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    if gt_labels.shape != logits.shape[:-1]:
        raise ValueError(f"gt_labels {tuple(gt_labels.shape)} must be the shape of logits {tuple(logits.shape)} without K")
    return _FocalLossSum.apply(logits, gt_labels, alpha, gamma, scale)


def valid_logits_and_targets(logits: Tensor, gt_labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Gather the non-ignored anchors and their one-hot targets.

    Args:
        logits (Tensor): (N, R, K).
        gt_labels (Tensor): (N, R) in {-1 (ignore), 0..K-1 (class), K (background)}.

    Returns:
        (Tensor, Tensor): logits (M, K) and 0/1 targets (M, K) of the M valid anchors;
        background rows are all zeros.
    """
    num_classes = logits.shape[-1]
    valid = gt_labels >= 0  # (N, R)
    targets = F.one_hot(gt_labels[valid], num_classes=num_classes + 1)[:, :num_classes]  # (M, K)
    return logits[valid], targets.to(logits.dtype)


def _check_alpha(alpha: Union[float, Tuple[float, ...]]) -> None:
    if isinstance(alpha, tuple):
        if not alpha or not all(0.0 <= a <= 1.0 for a in alpha):
            raise ValueError(
                f"MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA must hold one α in [0, 1] per class, got {list(alpha)}"
            )
    elif not math.isfinite(alpha) or alpha > 1:
        raise ValueError(
            "MODEL.RETINANET.FOCAL_LOSS_ALPHA must be in [0, 1], or negative to turn the "
            f"α weighting off, got {alpha}"
        )


def class_balanced_alpha(counts: Sequence[int], alpha: float, beta: float) -> List[float]:
    """One α per class from the class frequencies, by the "effective number of samples" of
    Cui et al. (CVPR 2019): w_k = (1 − β) / (1 − β^n_k) for the n_k boxes of class k,
    normalized to mean 1 over the classes, and α_k = min(1, α·w_k), so rare classes get the
    larger α (their positives weigh more, their negatives less). β in [0, 1); β → 1 gives
    inverse-frequency weights, β = 0 equal ones. A class without boxes gets w = 1/(1 − β)·(1 − β)
    as for n = 1.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA must be in [0, 1) (0 = off), got {beta}")
    weights = [(1.0 - beta) / (1.0 - beta ** max(int(n), 1)) for n in counts]
    mean = sum(weights) / len(weights)
    return [round(min(1.0, alpha * w / mean), 6) for w in weights]


def _alpha_from_config(cfg) -> Union[float, Tuple[float, ...]]:
    """``MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA`` when set (K values), else ``FOCAL_LOSS_ALPHA``."""
    class_alpha = tuple(cfg.MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA)
    if not class_alpha:
        return cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    if len(class_alpha) != num_classes:
        raise ValueError(
            f"MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA must have one value per class "
            f"(MODEL.RETINANET.NUM_CLASSES = {num_classes}), got {len(class_alpha)}: {list(class_alpha)}"
        )
    return class_alpha


@RETINA_FOCAL_LOSS_REGISTRY.register()
class FocalLoss(nn.Module):
    """The focal loss of §3.2 summed over all non-ignored anchors, divided by the normalizer.

    §4.1 ("Focal Loss"): applied to all ~100k anchors of each image, normalized by the
    number of anchors assigned to a ground-truth box. γ = 0 gives the α-balanced CE
    baseline of Table 1a. α may also be given per class (long-tailed data): a positive of
    class k is weighted by α_k, a negative in class column k by 1 - α_k.
    """

    @configurable
    def __init__(self, *, alpha: Union[float, Sequence[float]] = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha (float or sequence of K floats): α of eq. 5 in [0, 1] (a float < 0: off),
                or one α per class. 0.25 with γ = 2 is best in Table 1b.
            gamma (float): γ ≥ 0 of eq. 4; 2 is best in Table 1b.
        """
        super().__init__()
        self.alpha = float(alpha) if isinstance(alpha, (int, float)) else tuple(float(a) for a in alpha)
        _check_alpha(self.alpha)
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"MODEL.RETINANET.FOCAL_LOSS_GAMMA must be >= 0, got {gamma}")
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": _alpha_from_config(cfg),
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
        }

    def forward(
        self, logits: Tensor, gt_labels: Tensor, normalizer: float, anchors: Optional[Tensor] = None
    ) -> Tensor:
        """See ``RETINA_FOCAL_LOSS_REGISTRY`` for the arguments. Fused loss and gradient
        (:func:`focal_loss_sum`); :meth:`elementwise_loss` gives the same values per element."""
        return focal_loss_sum(logits, gt_labels, self._alpha_like(logits), self.gamma, scale=1.0 / normalizer)

    def elementwise_loss(self, logits: Tensor, targets: Tensor, reduction: str = "none") -> Tensor:
        """The loss of (M, K) logits against (M, K) 0/1 targets, with ``reduction`` applied."""
        return sigmoid_focal_loss(logits, targets, self._alpha_like(logits), self.gamma, reduction)

    def _alpha_like(self, logits: Tensor) -> Alpha:
        """The float α, or the per-class α as a (K,) tensor on ``logits``' device."""
        if isinstance(self.alpha, tuple):
            return torch.tensor(self.alpha, dtype=torch.float64, device=logits.device)
        return self.alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


@RETINA_FOCAL_LOSS_REGISTRY.register()
class FocalLossStar(FocalLoss):
    """FL* of Appendix A, summed over all non-ignored anchors, divided by the normalizer.

    FL* = -α_t log σ(γ x_t + β) / γ (eqs. 6-8): like FL it lowers the loss of
    well-classified examples (x_t > 0, Fig. 5) and reaches nearly FL's AP (Table 3). γ is
    ``MODEL.RETINANET.FOCAL_LOSS_GAMMA``, α as for :class:`FocalLoss` (Appendix A used
    α = .25 throughout), β is ``MODEL.RETINA_FOCAL.LOSS.BETA``.
    """

    @configurable
    def __init__(
        self, *, alpha: Union[float, Sequence[float]] = 0.25, gamma: float = 2.0, beta: float = 1.0
    ):
        """
        Args:
            alpha: as for :class:`FocalLoss`.
            gamma (float): steepness γ > 0 (FL* divides by γ).
            beta (float): shift β, any finite value. γ = 2, β = 1 and γ = 4, β = 0 are
                the settings of Fig. 5 / Table 3; γ = 1, β = 0 is the cross entropy.
        """
        if not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(
                f"MODEL.RETINANET.FOCAL_LOSS_GAMMA must be > 0 for FocalLossStar (FL* divides by γ), got {gamma}"
            )
        if not math.isfinite(beta):
            raise ValueError(f"MODEL.RETINA_FOCAL.LOSS.BETA must be finite, got {beta}")
        super().__init__(alpha=alpha, gamma=gamma)
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "beta": cfg.MODEL.RETINA_FOCAL.LOSS.BETA}

    def forward(
        self, logits: Tensor, gt_labels: Tensor, normalizer: float, anchors: Optional[Tensor] = None
    ) -> Tensor:
        valid_logits, targets = valid_logits_and_targets(logits, gt_labels)  # (M, K) each
        return self.elementwise_loss(valid_logits, targets, reduction="sum") / normalizer

    def elementwise_loss(self, logits: Tensor, targets: Tensor, reduction: str = "none") -> Tensor:
        return sigmoid_focal_loss_star(logits, targets, self._alpha_like(logits), self.gamma, self.beta, reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
