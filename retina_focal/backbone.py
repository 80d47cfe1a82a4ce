"""ResNet-FPN with levels P3–P7 as RetinaNet builds it (§4, footnote 2).

P3–P5 come from C3–C5 through 1×1 laterals and the top-down path (FPN), P6 is a 3×3
stride-2 conv on C5 (not on P5, and not a subsampling as in FPN), and P7 a 3×3 stride-2
conv applied after a ReLU on P6. All levels have ``MODEL.FPN.OUT_CHANNELS`` (256) channels
and strides 8…128. Parameter names equal detectron2's ``build_retinanet_resnet_fpn_backbone``
so its checkpoints (and the model zoo's) load unchanged.

With ``MODEL.RETINA_FOCAL.FOLD_FROZEN_BN`` (default) every ResNet convolution followed by a
frozen BatchNorm (``MODEL.RESNETS.NORM: FrozenBN``, ImageNet statistics) runs as a single
convolution: fewer passes over the activations in training and inference, the same
parameters and checkpoints.
"""
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["build_retina_focal_resnet_fpn_backbone", "fold_frozen_batchnorm", "FrozenBNFoldedConv2d", "P6_SOURCES"]

# Allowed values of MODEL.RETINA_FOCAL.P6_FROM: the feature P6 is computed from.
P6_SOURCES = ("res5", "p5")


class FrozenBNFoldedConv2d(Conv2d):
    """detectron2's ``Conv2d`` with a ``FrozenBatchNorm2d`` norm, computed as one convolution:
    BN(W * x + b) = (s·W) * x + s·b + (β - s·μ) with s = γ / sqrt(σ² + ε) per output channel.
    The scale is applied to the weight (C_out x C_in x k x k values) instead of the activations,
    and gradients reach ``weight`` through it. Parameters, buffers and state-dict keys are those
    of the ``Conv2d``; only float rounding differs."""

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        bias = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        x = F.conv2d(x, self.weight * scale.view(-1, 1, 1, 1), bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every detectron2 ``Conv2d`` in ``module`` whose norm is a ``FrozenBatchNorm2d`` a
    :class:`FrozenBNFoldedConv2d` (in place: the object keeps its parameters and buffers).
    Returns how many were folded."""
    folded = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = FrozenBNFoldedConv2d
            folded += 1
    return folded


@BACKBONE_REGISTRY.register()
def build_retina_focal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Build ResNet (``MODEL.RESNETS``) + FPN P3–P7 (``MODEL.FPN``, ``MODEL.RETINA_FOCAL.P6_FROM``).

    Returns:
        FPN: a detectron2 Backbone whose ``output_shape()`` is {"p3": stride 8, …, "p7": 128}.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RETINA_FOCAL.FOLD_FROZEN_BN:
        fold_frozen_batchnorm(bottom_up)
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
