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
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["build_retina_focal_resnet_fpn_backbone", "P6_SOURCES"]

# Allowed values of MODEL.RETINA_FOCAL.P6_FROM: the feature P6 is computed from.
P6_SOURCES = ("res5", "p5")


@BACKBONE_REGISTRY.register()
def build_retina_focal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Build ResNet (``MODEL.RESNETS``) + FPN P3–P7 (``MODEL.FPN``, ``MODEL.RETINA_FOCAL.P6_FROM``).

    Returns:
        FPN: a detectron2 Backbone whose ``output_shape()`` is {"p3": stride 8, …, "p7": 128}.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_features = cfg.MODEL.FPN.IN_FEATURES
    produced = bottom_up.output_shape()
    missing = [f for f in in_features if f not in produced]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES names {missing}, which the ResNet does not output "
            f"(MODEL.RESNETS.OUT_FEATURES gives {sorted(produced)})"
        )
    p6_from = cfg.MODEL.RETINA_FOCAL.P6_FROM
    if p6_from not in P6_SOURCES:
        raise ValueError(
            f"MODEL.RETINA_FOCAL.P6_FROM must be one of {sorted(P6_SOURCES)}, got {p6_from!r}"
        )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if p6_from == "res5":
        if "res5" not in produced:
            raise ValueError("MODEL.RETINA_FOCAL.P6_FROM='res5' needs 'res5' in MODEL.RESNETS.OUT_FEATURES")
        p6_in_channels = produced["res5"].channels
    else:
        p6_in_channels = out_channels
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(p6_in_channels, out_channels, in_feature=p6_from),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
