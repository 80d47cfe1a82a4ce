"""Backbones registered in detectron2's ``BACKBONE_REGISTRY``: bottom-up network + FPN, P3–P7
(fpn.py): ResNet (resnet_fpn.py) and MobileNetV2 (mobilenet_fpn.py)."""
from retina_focal.modeling.backbone.mobilenet_fpn import MobileNetV2, build_retina_focal_mobilenet_v2_fpn_backbone
from retina_focal.modeling.backbone.resnet_fpn import build_retina_focal_resnet_fpn_backbone

__all__ = ["MobileNetV2", "build_retina_focal_mobilenet_v2_fpn_backbone", "build_retina_focal_resnet_fpn_backbone"]
