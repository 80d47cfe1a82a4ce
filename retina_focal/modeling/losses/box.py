"""The box regression loss (§4: the R-CNN parameterization, smooth L1), and IoU losses."""
import torch
from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform
from fvcore.nn import giou_loss, smooth_l1_loss
from torch import Tensor

__all__ = ["BOX_REG_LOSS_TYPES", "box_regression_loss"]

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
    fg_pred = pred_deltas[fg_mask]  # (P, 4)
    fg_pred = fg_pred.to(torch.promote_types(fg_pred.dtype, torch.float32))  # half: in float32 (AMP)
    fg_gt = matched_gt_boxes[fg_mask]  # (P, 4)
    if loss_type == "smooth_l1":
        target = box2box_transform.get_deltas(fg_anchors, fg_gt)
        return smooth_l1_loss(fg_pred, target, beta=smooth_l1_beta, reduction="sum")
    if loss_type not in _BOX_IOU_LOSSES:
        raise ValueError(f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, got {loss_type!r}")
    pred_boxes = box2box_transform.apply_deltas(fg_pred, fg_anchors)
    return _BOX_IOU_LOSSES[loss_type](pred_boxes, fg_gt, reduction="sum")
