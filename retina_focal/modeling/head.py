"""The RetinaNet subnets of §4 (Figure 3c, 3d) and their initialization (§4.1).

Both subnets are small FCNs shared across pyramid levels: ``num_convs`` × (3×3 conv with C
channels + ReLU), then a 3×3 conv with K·A outputs (classification, read through a sigmoid)
or 4·A outputs (class-agnostic box deltas). The two towers do not share parameters.
"""
import math
from typing import List, Optional, Tuple

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from retina_focal.utils.registry import get_registered

__all__ = ["RETINA_FOCAL_HEAD_REGISTRY", "RetinaFocalHead", "RetinaFocalLightHead", "build_retina_focal_head"]

RETINA_FOCAL_HEAD_REGISTRY = Registry("RETINA_FOCAL_HEAD")
RETINA_FOCAL_HEAD_REGISTRY.__doc__ = """
Dense prediction heads for RetinaFocal, selected by ``MODEL.RETINA_FOCAL.HEAD_NAME``.

A head is built as ``obj(cfg, input_shape)`` with ``input_shape`` a list of ShapeSpec (one
per level of ``MODEL.RETINANET.IN_FEATURES``). ``forward(features)`` takes the list of
per-level features (N, C, Hi, Wi) and returns ``(logits, deltas)``: two lists with one
tensor per level, (N, A*K, Hi, Wi) classification logits and (N, A*4, Hi, Wi) box deltas,
where A is the anchor generator's ``num_cell_anchors[0]``.
"""


def build_retina_focal_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Build the head named by ``cfg.MODEL.RETINA_FOCAL.HEAD_NAME``."""
    head_cls = get_registered(
        RETINA_FOCAL_HEAD_REGISTRY, cfg.MODEL.RETINA_FOCAL.HEAD_NAME, "MODEL.RETINA_FOCAL.HEAD_NAME"
    )
    return head_cls(cfg, input_shape)


def prior_bias(prior_prob: float) -> float:
    """Bias b with sigmoid(b) = π: every anchor starts as foreground with confidence π (§3.3, §4.1)."""
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"MODEL.RETINANET.PRIOR_PROB must be in (0, 1), got {prior_prob}")
    return -math.log((1 - prior_prob) / prior_prob)


# Batch norms whose statistics would be mixed across pyramid levels by a shared head.
_PER_LEVEL_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN")


def conv_tower(channels: int, num_convs: int, norm: str = "", in_channels: Optional[int] = None) -> nn.Sequential:
    """``num_convs`` × (3×3 conv, [norm], ReLU) at constant width; 4 convs in §4.

    With ``in_channels`` other than ``channels``, a 1×1 conv + ReLU first maps the input
    to the tower's width.
    """
    layers: List[nn.Module] = []
    if in_channels is not None and in_channels != channels:
        layers += [nn.Conv2d(in_channels, channels, kernel_size=1), nn.ReLU()]
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1))
        if norm:
            layers.append(get_norm(norm, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def init_gaussian_(module: nn.Module, std: float = 0.01) -> None:
    """§4.1: new conv layers get weights N(0, σ=0.01) and bias 0; norm layers are identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, nn.GroupNorm):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


@RETINA_FOCAL_HEAD_REGISTRY.register()
class RetinaFocalHead(nn.Module):
    """Classification and box subnets of §4, shared across levels.

    Parameter names (``cls_subnet``, ``bbox_subnet``, ``cls_score``, ``bbox_pred``) match
    detectron2's ``RetinaNetHead`` so its checkpoints load unchanged.

    Example::

        head = RetinaFocalHead(in_channels=256, num_anchors=9, num_classes=80)
        logits, deltas = head([torch.zeros(2, 256, 32, 32)])  # (2, 720, 32, 32), (2, 36, 32, 32)
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "",
        prior_prob: float = 0.01,
        tower_channels: Optional[int] = None,
    ):
        """
        Args:
            in_channels (int): C, channels of every input level (256 in §4).
            num_anchors (int): A, anchors per location (9 in §4).
            num_classes (int): K, object classes (no background class: sigmoid outputs).
            num_convs (int): 3×3 convs in each tower (4 in §4; 0 allowed).
            norm (str): "" (paper), or a detectron2 norm name such as "GN" placed after each
                tower conv (GroupNorm as in later RetinaNet recipes); batch norms are rejected.
            prior_prob (float): π of §3.3; the classifier starts at sigmoid = π.
            tower_channels (int or None): width of the towers; None = ``in_channels`` (§4).
                Another width adds a 1×1 conv at the start of each tower.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(
                f"MODEL.RETINANET.NUM_CLASSES must be >= 1, got {num_classes} (0 takes the training set's "
                "number of classes when the config is loaded by train_net.py or retina_focal.engine.load_config)"
            )
        if num_convs < 0:
            raise ValueError(f"MODEL.RETINANET.NUM_CONVS must be >= 0, got {num_convs}")
        if norm in _PER_LEVEL_NORMS:
            raise ValueError(
                f"MODEL.RETINANET.NORM={norm!r} is not supported: a head shared across levels needs "
                "per-level batch statistics (detectron2's CycleBatchNormList); use 'GN' or ''"
            )
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        width = tower_channels or in_channels
        self.cls_subnet = conv_tower(width, num_convs, norm, in_channels)
        self.bbox_subnet = conv_tower(width, num_convs, norm, in_channels)
        self.cls_score = nn.Conv2d(width, num_anchors * num_classes, 3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(width, num_anchors * 4, 3, stride=1, padding=1)
        for module in (self.cls_subnet, self.bbox_subnet, self.cls_score, self.bbox_pred):
            init_gaussian_(module)
        nn.init.constant_(self.cls_score.bias, prior_bias(prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"The head is shared across levels, so all need equal channels; got {channels}")
        anchors_per_level = set(build_anchor_generator(cfg, input_shape).num_cell_anchors)
        if len(anchors_per_level) != 1:
            raise ValueError(f"The head is shared across levels, so all need equal anchor counts; got {anchors_per_level}")
        num_anchors = anchors_per_level.pop()
        return {
            "in_channels": channels.pop(),
            "num_anchors": num_anchors,
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "num_convs": cfg.MODEL.RETINANET.NUM_CONVS,
            "norm": cfg.MODEL.RETINANET.NORM,
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features (list[Tensor]): per level (N, C, Hi, Wi).

        Returns:
            logits (list[Tensor]): per level (N, A*K, Hi, Wi), before the sigmoid.
            deltas (list[Tensor]): per level (N, A*4, Hi, Wi), Box2BoxTransform deltas.
        """
        logits = [self.cls_score(self.cls_subnet(f)) for f in features]
        deltas = [self.bbox_pred(self.bbox_subnet(f)) for f in features]
        return logits, deltas


@RETINA_FOCAL_HEAD_REGISTRY.register()
class RetinaFocalLightHead(RetinaFocalHead):
    """A cheaper head for the speed/accuracy trade-off (Table 1e and Figure 2 vary depth and
    scale; the head is the other big cost: at C = 256 the two towers' 8 convs take about
    4.7 M multiply-adds per location, 6× the FPN's lateral and output convs).

    Same structure as :class:`RetinaFocalHead` with towers of
    ``MODEL.RETINA_FOCAL.LIGHT_HEAD.CHANNELS`` channels (a 1×1 conv maps the C input
    channels to that width) and ``MODEL.RETINA_FOCAL.LIGHT_HEAD.NUM_CONVS`` convs each.
    Halving the width cuts the tower FLOPs about 4×.
    """

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["tower_channels"] = cfg.MODEL.RETINA_FOCAL.LIGHT_HEAD.CHANNELS
        ret["num_convs"] = cfg.MODEL.RETINA_FOCAL.LIGHT_HEAD.NUM_CONVS
        return ret
