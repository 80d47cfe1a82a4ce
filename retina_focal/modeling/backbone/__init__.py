"""Backbones registered in detectron2's ``BACKBONE_REGISTRY``: bottom-up network + FPN, P3–P7."""
from retina_focal.modeling.backbone.resnet_fpn import (
    build_retina_focal_resnet_fpn_backbone,
)

__all__ = ["build_retina_focal_resnet_fpn_backbone"]
