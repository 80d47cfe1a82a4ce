"""The classification losses of RetinaFocal and the box loss.

A classification loss is chosen by ``MODEL.RETINA_FOCAL.LOSS.NAME`` and sees the whole
batch at once: the logits of every anchor (N, R, K), the anchor labels produced by the
matcher (N, R) and the loss normalizer. It returns one scalar, already normalized, so
losses that select anchors (OHEM) or re-weight them fit the same interface.

* ``registry.py``: ``RETINA_FOCAL_LOSS_REGISTRY`` and ``build_retina_focal_loss``;
* ``focal.py``: the focal loss (§3.2, eq. 5; one α per class optional) as a readable
  elementwise function and as the fused form that trains, ``FocalLoss`` and FL*
  (``FocalLossStar``, Appendix A);
* ``ohem.py``: ``OHEMLoss``, online hard example mining (§5.1, Table 1d);
* ``box.py``: the box regression loss (smooth L1, §4; GIoU, DIoU, CIoU).
"""
from retina_focal.modeling.losses.box import BOX_REG_LOSS_TYPES, box_regression_loss
from retina_focal.modeling.losses.focal import (
    FocalLoss,
    FocalLossStar,
    class_balanced_alpha,
    focal_loss_sum,
    focal_loss_sum_and_grad,
    sigmoid_focal_loss,
    sigmoid_focal_loss_star,
    valid_logits_and_targets,
)
from retina_focal.modeling.losses.ohem import (
    OHEMLoss,
    anchor_cross_entropy,
    select_hard_examples,
)
from retina_focal.modeling.losses.registry import (
    RETINA_FOCAL_LOSS_REGISTRY,
    build_retina_focal_loss,
)

__all__ = [
    "RETINA_FOCAL_LOSS_REGISTRY",
    "BOX_REG_LOSS_TYPES",
    "FocalLoss",
    "FocalLossStar",
    "OHEMLoss",
    "anchor_cross_entropy",
    "box_regression_loss",
    "build_retina_focal_loss",
    "class_balanced_alpha",
    "focal_loss_sum",
    "focal_loss_sum_and_grad",
    "select_hard_examples",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "valid_logits_and_targets",
]
