"""The registry of classification losses (``MODEL.RETINA_FOCAL.LOSS.NAME``) and its builder."""
from detectron2.utils.registry import Registry
from torch import nn

from retina_focal.utils.registry import get_registered

__all__ = ["RETINA_FOCAL_LOSS_REGISTRY", "build_retina_focal_loss"]

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


def build_retina_focal_loss(cfg) -> nn.Module:
    """Build the classification loss named by ``cfg.MODEL.RETINA_FOCAL.LOSS.NAME``."""
    loss_cls = get_registered(
        RETINA_FOCAL_LOSS_REGISTRY, cfg.MODEL.RETINA_FOCAL.LOSS.NAME, "MODEL.RETINA_FOCAL.LOSS.NAME"
    )
    return loss_cls(cfg)
