"""retina_focal: RetinaNet and the focal loss (Lin et al., ICCV 2017) for detectron2.

``import retina_focal`` registers, in detectron2's registries, the meta-architecture
``RetinaFocal``, the backbone builders ``build_retina_focal_resnet_fpn_backbone`` and
``build_retina_focal_mobilenet_v2_fpn_backbone`` and the anchor generator
``RetinaFocalAnchorGenerator``; in the plugin's own registries, the heads ``RetinaFocalHead``
and ``RetinaFocalLightHead``, the losses ``FocalLoss``, ``FocalLossStar`` and ``OHEMLoss``,
and the inference backends ``compiled`` and ``onnxruntime`` (``TEST.BACKEND.NAME``); and, in
detectron2's PathManager, ``torchvision://<model>`` (torchvision's ImageNet weights).
The folders are laid out by job (docs/architecture.md); ``modeling/`` is the paper.
"""
__version__ = "0.1.0"

from retina_focal import data  # noqa: F401  (retina_focal.data.register_shapes; train_net registers them)
from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.config import add_retina_focal_config
from retina_focal.diagnostics import measure_coverage, propose_anchors
from retina_focal.engine.hooks import ValidationLoss
from retina_focal.evaluation import (
    RetinaFocalCOCOEvaluator,
    RetinaFocalFastCOCOEvaluator,
)
from retina_focal.export.backends import (
    INFERENCE_BACKEND_REGISTRY,
    build_inference_model,
)
from retina_focal.modeling import (
    RETINA_FOCAL_HEAD_REGISTRY,
    RETINA_FOCAL_LOSS_REGISTRY,
    EveryGTMatcher,
    FocalLoss,
    FocalLossStar,
    OHEMLoss,
    RetinaFocal,
    RetinaFocalAnchorGenerator,
    RetinaFocalHead,
    RetinaFocalLightHead,
    build_anchor_matcher,
    build_retina_focal_head,
    build_retina_focal_loss,
    build_retina_focal_resnet_fpn_backbone,
    sigmoid_focal_loss,
)

__all__ = [
    "add_retina_focal_config",
    "RetinaFocalAnchorGenerator",
    "build_retina_focal_resnet_fpn_backbone",
    "RETINA_FOCAL_HEAD_REGISTRY",
    "RetinaFocalHead",
    "RetinaFocalLightHead",
    "build_retina_focal_head",
    "RETINA_FOCAL_LOSS_REGISTRY",
    "FocalLoss",
    "FocalLossStar",
    "OHEMLoss",
    "build_retina_focal_loss",
    "sigmoid_focal_loss",
    "EveryGTMatcher",
    "build_anchor_matcher",
    "RetinaFocal",
    "RetinaFocalCheckpointer",
    "RetinaFocalCOCOEvaluator",
    "RetinaFocalFastCOCOEvaluator",
    "ValidationLoss",
    "INFERENCE_BACKEND_REGISTRY",
    "build_inference_model",
    "measure_coverage",
    "propose_anchors",
]
