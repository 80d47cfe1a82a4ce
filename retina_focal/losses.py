"""The focal loss (§3, eq. 5) and the registry of classification losses.

A classification loss is chosen by ``MODEL.RETINA_FOCAL.LOSS.NAME`` and sees the whole
batch at once: the logits of every anchor (N, R, K), the anchor labels produced by the
matcher (N, R) and the loss normalizer. It returns one scalar, already normalized, so
losses that select anchors (OHEM) or re-weight them fit the same interface.
"""
import math
from typing import Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform
from fvcore.nn import giou_loss, smooth_l1_loss
from detectron2.utils.registry import Registry
from torch import Tensor, nn
from torch.nn import functional as F

from .utils import get_registered

__all__ = [
    "RETINA_FOCAL_LOSS_REGISTRY",
    "FocalLoss",
    "box_regression_loss",
    "build_retina_focal_loss",
    "sigmoid_focal_loss",
    "valid_logits_and_targets",
]

RETINA_FOCAL_LOSS_REGISTRY = Registry("RETINA_FOCAL_LOSS")
RETINA_FOCAL_LOSS_REGISTRY.__doc__ = """
Classification losses for RetinaFocal, selected by ``MODEL.RETINA_FOCAL.LOSS.NAME``.

Built as ``obj(cfg)``. ``forward(logits, gt_labels, normalizer, anchors=None)`` takes

* logits (Tensor): (N, R, K) classification logits of all R anchors of N images;
* gt_labels (Tensor): (N, R) int64, a class in [0, K) for foreground anchors, K for
  background and -1 for ignored anchors (IoU in [0.4, 0.5), §4);
* normalizer (float): the (smoothed) number of foreground anchors (§4.1);
* anchors (Tensor): (R, 4) XYXY anchors, the same for every image, for losses that need
  geometry (e.g. OHEM's NMS);

and returns the scalar loss, already normalized.
"""

_REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
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
        alpha (float): weight α of the positives in [0, 1], negatives get 1 - α; < 0
            disables the weighting.
        gamma (float): focusing parameter γ ≥ 0; γ = 0 gives α-balanced CE (eq. 3).
        reduction (str): "none" | "mean" | "sum".

    Returns:
        Tensor: the loss with ``reduction`` applied, float32 (float64 for float64 inputs).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    dtype = torch.promote_types(inputs.dtype, torch.float32)  # AMP-safe: never in half
    inputs = inputs.to(dtype)
    targets = targets.to(dtype)
    signs = 2.0 * targets - 1.0  # +1 for positives, -1 for negatives
    x_t = inputs * signs  # log-odds of the true class
    loss = -F.logsigmoid(x_t)  # CE = -log(p_t)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-x_t))  # (1 - p_t)^γ
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))  # α_t
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


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


def _check_alpha_gamma(alpha: float, gamma: float) -> None:
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"MODEL.RETINANET.FOCAL_LOSS_GAMMA must be >= 0, got {gamma}")
    if not math.isfinite(alpha) or alpha > 1:
        raise ValueError(
            "MODEL.RETINANET.FOCAL_LOSS_ALPHA must be in [0, 1], or negative to turn the "
            f"α weighting off, got {alpha}"
        )


@RETINA_FOCAL_LOSS_REGISTRY.register()
class FocalLoss(nn.Module):
    """The focal loss of §3.2 summed over all non-ignored anchors, divided by the normalizer.

    §4.1 ("Focal Loss"): applied to all ~100k anchors of each image, normalized by the
    number of anchors assigned to a ground-truth box. γ = 0 gives the α-balanced CE
    baseline of Table 1a.
    """

    @configurable
    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha (float): α of eq. 5 in [0, 1] (< 0: off). 0.25 with γ = 2 is best in Table 1b.
            gamma (float): γ ≥ 0 of eq. 4; 2 is best in Table 1b.
        """
        super().__init__()
        _check_alpha_gamma(alpha, gamma)
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        return {
            "alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
        }

    def forward(
        self, logits: Tensor, gt_labels: Tensor, normalizer: float, anchors: Optional[Tensor] = None
    ) -> Tensor:
        """See ``RETINA_FOCAL_LOSS_REGISTRY`` for the arguments."""
        valid_logits, targets = valid_logits_and_targets(logits, gt_labels)  # (M, K) each
        loss = sigmoid_focal_loss(valid_logits, targets, self.alpha, self.gamma, reduction="sum")
        return loss / normalizer

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


def build_retina_focal_loss(cfg) -> nn.Module:
    """Build the classification loss named by ``cfg.MODEL.RETINA_FOCAL.LOSS.NAME``."""
    loss_cls = get_registered(
        RETINA_FOCAL_LOSS_REGISTRY, cfg.MODEL.RETINA_FOCAL.LOSS.NAME, "MODEL.RETINA_FOCAL.LOSS.NAME"
    )
    return loss_cls(cfg)


# BBOX_REG_LOSS_TYPE -> loss on decoded boxes (x1, y1, x2, y2); "smooth_l1" works on deltas.
_BOX_IOU_LOSSES = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}
BOX_REG_LOSS_TYPES = ("smooth_l1",) + tuple(_BOX_IOU_LOSSES)


def box_regression_loss(
    anchors: Tensor,
    pred_deltas: Tensor,
    matched_gt_boxes: Tensor,
    fg_mask: Tensor,
    box2box_transform: Box2BoxTransform,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> Tensor:
    """Sum of the box loss over foreground anchors (the R-CNN parameterization, §4).

    Same value as detectron2's ``_dense_box_regression_loss``, but targets are encoded (or
    predictions decoded) for the foreground anchors only, not for all N·R anchors.

    Args:
        anchors (Tensor): (R, 4) XYXY anchors, shared by the N images.
        pred_deltas (Tensor): (N, R, 4) predicted deltas.
        matched_gt_boxes (Tensor): (N, R, 4) matched ground-truth boxes (used where fg).
        fg_mask (Tensor): (N, R) bool, foreground anchors.
        loss_type (str): one of ``BOX_REG_LOSS_TYPES``.
        smooth_l1_beta (float): β of smooth-L1 (0 = L1).

    Returns:
        Tensor: scalar, not normalized.
    """
    fg_anchors = anchors.unsqueeze(0).expand_as(pred_deltas)[fg_mask]  # (P, 4)
    fg_pred = pred_deltas[fg_mask].float()  # (P, 4)
    fg_gt = matched_gt_boxes[fg_mask]  # (P, 4)
    if loss_type == "smooth_l1":
        target = box2box_transform.get_deltas(fg_anchors, fg_gt)
        return smooth_l1_loss(fg_pred, target, beta=smooth_l1_beta, reduction="sum")
    if loss_type not in _BOX_IOU_LOSSES:
        raise ValueError(f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, got {loss_type!r}")
    pred_boxes = box2box_transform.apply_deltas(fg_pred, fg_anchors)
    return _BOX_IOU_LOSSES[loss_type](pred_boxes, fg_gt, reduction="sum")
