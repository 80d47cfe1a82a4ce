"""MobileNetV2-FPN, P3–P7: torchvision's MobileNetV2 (Sandler et al., 2018) as the bottom-up
network of §4's FPN, for CPUs and for starting from torchvision's ImageNet weights
(``MODEL.WEIGHTS torchvision://mobilenet_v2``, found offline: retina_focal/checkpoint).

The bottom-up network is torchvision's ``mobilenet_v2().features`` (module names kept, so its
weights load by name) cut into detectron2's stages by stride: stem (2), res2 (4), res3 (8, 32
channels), res4 (16, 96), res5 (32, 320). ImageNet's last 1×1 conv to 1280 channels and the
classifier are left out. Keys: ``MODEL.MOBILENET_V2.WIDTH_MULT`` and ``NORM``,
``MODEL.BACKBONE.FREEZE_AT`` (stem = 1, res2 = 2, ... as for ResNets). Its weights expect RGB
images normalized by ImageNet's mean and std (``INPUT.FORMAT RGB``, ``MODEL.PIXEL_MEAN``
[123.675, 116.28, 103.53], ``MODEL.PIXEL_STD`` [58.395, 57.12, 57.375]; loading them into a
model normalized otherwise is an error naming these keys).
"""
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone

from retina_focal.config.defaults import config_extension
from retina_focal.modeling.backbone.fpn import build_p3_p7_fpn

__all__ = ["MobileNetV2", "build_retina_focal_mobilenet_v2_fpn_backbone"]

# [first, last) block of torchvision's mobilenet_v2().features in each stage, by stride.
STAGES = {"stem": (0, 2), "res2": (2, 4), "res3": (4, 7), "res4": (7, 14), "res5": (14, 18)}
NORMS = ("FrozenBN", "BN")


@config_extension
def add_mobilenet_v2_config(cfg: CN) -> None:
    """``MODEL.MOBILENET_V2``: the backbone's own keys."""
    _C = cfg
    _C.MODEL.MOBILENET_V2 = CN()
    # Channel multiplier of every layer (torchvision's width_mult; ImageNet weights exist for 1.0).
    _C.MODEL.MOBILENET_V2.WIDTH_MULT = 1.0
    # "FrozenBN": BatchNorm with the weights' statistics, fixed (small batches, as ResNets in §4.1);
    # "BN": trained BatchNorm.
    _C.MODEL.MOBILENET_V2.NORM = "FrozenBN"


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 features as a detectron2 Backbone (module docstring)."""

    def __init__(self, *, width_mult: float = 1.0, out_features=("res3", "res4", "res5"), freeze_at: int = 2,
                 norm: str = "FrozenBN"):
        import torchvision

        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENET_V2.NORM must be one of {list(NORMS)}, got {norm!r}")
        unknown = [f for f in out_features if f not in STAGES]
        if unknown:
            raise ValueError(f"MODEL.MOBILENET_V2 outputs {list(STAGES)}, not {unknown} (MODEL.FPN.IN_FEATURES)")
        self.features = torchvision.models.mobilenet_v2(width_mult=width_mult).features[: STAGES["res5"][1]]
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        self._out_features = list(out_features)
        self._out_feature_strides, self._out_feature_channels = self._shapes()
        self.freeze(freeze_at)

    def _shapes(self):
        """Stride and channels of every stage, from a forward pass of a small blank image."""
        with torch.no_grad():
            outputs = self._stages(torch.zeros(1, 3, 64, 64))
        strides = {name: 64 // x.shape[-1] for name, x in outputs.items()}
        return strides, {name: x.shape[1] for name, x in outputs.items()}

    def _stages(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        for name, (first, last) in STAGES.items():
            for block in self.features[first:last]:
                x = block(x)
            outputs[name] = x
        return outputs

    def freeze(self, freeze_at: int) -> "MobileNetV2":
        """No gradient for the first ``freeze_at`` stages (1: stem; 2: stem and res2; 0: none)."""
        for name in list(STAGES)[:freeze_at]:
            first, last = STAGES[name]
            for p in self.features[first:last].parameters():
                p.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = self._stages(x)
        return {name: outputs[name] for name in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_retina_focal_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 (``MODEL.MOBILENET_V2``) + FPN P3–P7 (``MODEL.FPN``, ``MODEL.RETINA_FOCAL.P6_FROM``)."""
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 reads 3-channel images, got {input_shape.channels} (MODEL.PIXEL_MEAN)")
    needed = set(cfg.MODEL.FPN.IN_FEATURES) | ({cfg.MODEL.RETINA_FOCAL.P6_FROM} & set(STAGES))  # P6's input too
    bottom_up = MobileNetV2(
        width_mult=cfg.MODEL.MOBILENET_V2.WIDTH_MULT,
        out_features=[name for name in STAGES if name in needed] + sorted(needed - set(STAGES)),  # unknown: an error
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=cfg.MODEL.MOBILENET_V2.NORM,
    )
    return build_p3_p7_fpn(cfg, bottom_up, "MODEL.FPN.IN_FEATURES (MobileNetV2 outputs stem, res2-res5)")
