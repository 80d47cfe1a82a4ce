"""The paper: RetinaFocal (§4, Figure 3) and its parts, one module per concept.

Read in the order the detector runs: ``meta_arch.py`` (preprocess → backbone → head →
label → loss / decode → NMS), ``backbone/`` (FPN P3–P7), ``anchors.py``, ``head.py`` (§3.3
prior, §4 subnets), ``matching.py`` (the §4 IoU rule), ``losses/`` (focal loss §3, FL*
App. A, OHEM §5.1, box losses), ``postprocess.py`` (§4.1 inference). Around them:
``input_checks.py`` (training batches), ``assignment_metrics.py`` (the ``assign/*`` scalars),
``precision.py`` (autocast), ``fast_layers.py`` (speed transforms), ``tta.py``.

This package imports only detectron2, torch, ``retina_focal.config`` and
``retina_focal.utils`` (tests/modeling/test_import_rule.py checks it); the trainer, data
readers, evaluation and export import it, never the reverse.
"""
from retina_focal.modeling.anchors import RetinaFocalAnchorGenerator
from retina_focal.modeling.backbone import build_retina_focal_resnet_fpn_backbone
from retina_focal.modeling.head import (
    RETINA_FOCAL_HEAD_REGISTRY,
    RetinaFocalHead,
    RetinaFocalLightHead,
    build_retina_focal_head,
)
from retina_focal.modeling.losses import (
    RETINA_FOCAL_LOSS_REGISTRY,
    FocalLoss,
    FocalLossStar,
    OHEMLoss,
    build_retina_focal_loss,
    sigmoid_focal_loss,
)
from retina_focal.modeling.matching import EveryGTMatcher, build_anchor_matcher
from retina_focal.modeling.meta_arch import RetinaFocal
from retina_focal.modeling.tta import RetinaFocalWithTTA

__all__ = [
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
    "RetinaFocalWithTTA",
]
