"""ResNet-FPN with levels P3–P7 as RetinaNet builds it (§4, footnote 2).

P3–P5 come from C3–C5 through 1×1 laterals and the top-down path (FPN), P6 is a 3×3
stride-2 conv on C5 (not on P5, and not a subsampling as in FPN), and P7 a 3×3 stride-2
conv applied after a ReLU on P6. All levels have ``MODEL.FPN.OUT_CHANNELS`` (256) channels
and strides 8…128. Parameter names equal detectron2's ``build_retinanet_resnet_fpn_backbone``
so its checkpoints (and the model zoo's) load unchanged.

(``MODEL.RETINA_FOCAL.FOLD_FROZEN_BN`` folds the frozen BatchNorms into the convolutions when
RetinaFocal is built: retina_focal/modeling/fast_layers.py.)
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, build_resnet_backbone

from retina_focal.modeling.backbone.fpn import build_p3_p7_fpn

__all__ = ["build_retina_focal_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_retina_focal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Build ResNet (``MODEL.RESNETS``) + FPN P3–P7 (``MODEL.FPN``, ``MODEL.RETINA_FOCAL.P6_FROM``).

    Returns:
        FPN: a detectron2 Backbone whose ``output_shape()`` is {"p3": stride 8, …, "p7": 128}.
    """
    return build_p3_p7_fpn(cfg, build_resnet_backbone(cfg, input_shape), "MODEL.RESNETS.OUT_FEATURES")
