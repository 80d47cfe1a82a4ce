"""RetinaFocal: the one-stage detector of §4 (Figure 3), a detectron2 ``DenseDetector``.

In the order it runs (``DenseDetector.forward``, as detectron2's ``RetinaNet``):

1. preprocess: normalize, pad to the backbone's size divisibility, batch;
2. backbone: ResNet-FPN, levels P3–P7 (backbone/resnet_fpn.py);
3. head: class and box subnets on every level (head.py);
4. training, :meth:`forward_training`: anchors (anchors.py) labelled by the §4 IoU rule
   (:meth:`label_anchors`, matching.py), then the classification loss from the registry
   (the focal loss, losses/) and the box loss, both divided by the number of foreground
   anchors (§4.1, :meth:`losses`);
5. inference, :meth:`forward_inference`: per level, scores thresholded at 0.05 and at most
   1000 top-scoring candidates decoded; levels merged; class-wise NMS at 0.5; top 100 kept
   (§4.1 "Inference", :meth:`detections`); boxes rescaled to the requested output size.

Around this flow, not inside it: :meth:`forward` checks the training inputs
(input_checks.py) and opens ``TEST.AMP``'s autocast (precision.py); :meth:`forward_training`
logs the ``assign/*`` metrics (assignment_metrics.py); the speed transforms
(fast_layers.py) are applied once when the model is built.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat, nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from retina_focal.config.defaults import warn_ignored_settings
from retina_focal.modeling.assignment_metrics import (
    log_assignment_metrics,
    warn_if_anchors_miss_boxes,
)
from retina_focal.modeling.backbone.fpn import check_features_produced
from retina_focal.modeling.fast_layers import apply_speed_transforms, channels_last_by_default
from retina_focal.modeling.head import build_retina_focal_head
from retina_focal.modeling.input_checks import check_training_inputs, drop_empty_boxes
from retina_focal.modeling.losses import (
    BOX_REG_LOSS_TYPES,
    box_regression_loss,
    build_retina_focal_loss,
)
from retina_focal.modeling.matching import (
    AnchorAssignment,
    anchor_matcher_from_config,
    assign_anchors,
    foreground_iou_threshold,
)
from retina_focal.modeling.postprocess import (
    InferenceSettings,
    check_score_thresholds,
    fast_detections,
)
from retina_focal.modeling.precision import amp_dtype, autocast, full_precision

__all__ = ["RetinaFocal"]

logger = logging.getLogger(__name__)


def _channels_last(cfg) -> bool:
    """``MODEL.RETINA_FOCAL.CHANNELS_LAST``, or where it is None, what the device prefers."""
    value = cfg.MODEL.RETINA_FOCAL.CHANNELS_LAST
    return channels_last_by_default(torch.device(cfg.MODEL.DEVICE).type) if value is None else value


@META_ARCH_REGISTRY.register()
class RetinaFocal(DenseDetector):
    """RetinaNet with a swappable head and classification loss.

    Inputs and outputs follow detectron2's model format: ``forward`` takes the list of
    dicts produced by ``DatasetMapper`` and returns a loss dict in training, and
    ``[{"instances": Instances}]`` with ``pred_boxes``, ``scores``, ``pred_classes`` at test
    time. Module names (``backbone``, ``head``) equal detectron2's ``RetinaNet``, so its
    checkpoints load with no missing or unexpected keys.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        num_classes: int,
        cls_loss: nn.Module,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.1,
        loss_normalizer_momentum: float = 0.9,
        test_score_thresh: Union[float, Sequence[float]] = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        class_agnostic_nms: bool = False,
        inference_dtype: Optional[torch.dtype] = None,
        fold_frozen_bn: bool = True,
        channels_last: Optional[bool] = None,
        fast_postprocess: bool = True,
        unmatched_gt_warn_fraction: float = 0.5,
        crowd_ignore_ioa: float = 0.0,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ):
        """
        Args:
            backbone (Backbone): produces the features named in ``head_in_features``.
            head (nn.Module): see ``RETINA_FOCAL_HEAD_REGISTRY``.
            head_in_features (list[str]): feature names fed to the head, e.g. p3…p7.
            anchor_generator (nn.Module): per-level anchors (list[Boxes]) from features.
            box2box_transform (Box2BoxTransform): the R-CNN box parameterization.
            anchor_matcher (Matcher): the §4 IoU rule (fg ≥ 0.5, bg < 0.4, ignore between).
            num_classes (int): K.
            cls_loss (nn.Module): see ``RETINA_FOCAL_LOSS_REGISTRY``.
            box_reg_loss_type (str): "smooth_l1" | "giou" | "diou" | "ciou".
            smooth_l1_beta (float): β of smooth-L1 (0 = L1).
            loss_normalizer_momentum (float): EMA momentum of the foreground count in [0, 1).
            test_score_thresh (float or K floats): drop candidates scoring ≤ this (0.05,
                §4.1), or one threshold per class.
            test_topk_candidates (int): candidates kept per level before NMS (1000, §4.1).
            test_nms_thresh (float): class-wise NMS IoU threshold (0.5, §4.1).
            max_detections_per_image (int): detections kept per image (100, COCO).
            class_agnostic_nms (bool): one NMS over all classes instead of one per class.
            inference_dtype (torch.dtype or None): in eval mode, run backbone and head under
                ``torch.autocast(device, inference_dtype)`` (``TEST.AMP``). None: open no
                autocast, so one opened by the caller (e.g. the AMP trainer's) applies. Losses
                and post-processing run in float32 under any autocast.
            fold_frozen_bn, channels_last, fast_postprocess (bool): the speed transforms of
                retina_focal/modeling/fast_layers.py and postprocess.py (float rounding only).
                channels_last None: :func:`channels_last_by_default` for CUDA where it is
                available, else for this CPU (``from_config`` decides by ``MODEL.DEVICE``).
            unmatched_gt_warn_fraction (float): warn (once) when more than this share of a
                training batch's boxes has no anchor with the foreground IoU (in [0, 1]).
            crowd_ignore_ioa (float): > 0: background anchors covered by a crowd region by
                more than this share of their area are ignored (retina_focal/data/mapper.py);
                0: crowd regions play no part (the paper).
            pixel_mean, pixel_std: per-channel input normalization.
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, got {box_reg_loss_type!r}"
            )
        if not 0.0 <= loss_normalizer_momentum < 1.0:
            raise ValueError(
                "MODEL.RETINA_FOCAL.LOSS_NORMALIZER_MOMENTUM must be in [0, 1), got "
                f"{loss_normalizer_momentum}"
            )
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.num_classes = num_classes
        self.cls_loss = cls_loss
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalizer_momentum = loss_normalizer_momentum
        # Running number of foreground anchors per batch (§4.1's normalizer, smoothed); 100 is
        # detectron2's start value. A float64 buffer: saved and resumed with the weights (its own
        # state-dict entry), and updated with Python's float arithmetic, as detectron2 does.
        self.register_buffer("loss_normalizer", torch.tensor(100.0, dtype=torch.float64))
        self.inference_settings = InferenceSettings(
            check_score_thresholds(test_score_thresh, num_classes),
            test_topk_candidates,
            test_nms_thresh,
            max_detections_per_image,
            class_agnostic_nms,
        )
        self.inference_dtype = inference_dtype
        self.fast_postprocess = fast_postprocess
        self.unmatched_gt_warn_fraction = unmatched_gt_warn_fraction
        if not 0.0 <= crowd_ignore_ioa <= 1.0:
            raise ValueError(f"MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA must be in [0, 1] (0 = off), got {crowd_ignore_ioa}")
        self.crowd_ignore_ioa = crowd_ignore_ioa
        self._warned_unmatched_gt = False
        if channels_last is None:
            channels_last = channels_last_by_default("cuda" if torch.cuda.is_available() else "cpu")
        apply_speed_transforms(self.backbone, self.head, fold_frozen_bn=fold_frozen_bn, channels_last=channels_last)

    @classmethod
    def from_config(cls, cfg):
        warn_ignored_settings(cfg)
        backbone = build_backbone(cfg)
        produced = backbone.output_shape()
        in_features = cfg.MODEL.RETINANET.IN_FEATURES
        check_features_produced("MODEL.RETINANET.IN_FEATURES", in_features, produced, f"the backbone ({cfg.MODEL.BACKBONE.NAME})")
        feature_shapes: List[ShapeSpec] = [produced[f] for f in in_features]
        return {
            "backbone": backbone,
            "head": build_retina_focal_head(cfg, feature_shapes),
            "head_in_features": in_features,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS),
            # §4: IoU >= 0.5 foreground, < 0.4 background, in between ignored; each
            # ground-truth box also keeps its best anchors (low-quality matches, as in RPN).
            "anchor_matcher": anchor_matcher_from_config(cfg),
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "cls_loss": build_retina_focal_loss(cfg),
            "box_reg_loss_type": cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA,
            "loss_normalizer_momentum": cfg.MODEL.RETINA_FOCAL.LOSS_NORMALIZER_MOMENTUM,
            "test_score_thresh": cfg.MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH or cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "class_agnostic_nms": cfg.MODEL.RETINA_FOCAL.CLASS_AGNOSTIC_NMS,
            "inference_dtype": (
                amp_dtype(cfg.TEST.AMP.PRECISION, cfg.MODEL.DEVICE, "TEST.AMP.PRECISION") if cfg.TEST.AMP.ENABLED else None
            ),
            "fold_frozen_bn": cfg.MODEL.RETINA_FOCAL.FOLD_FROZEN_BN,
            "channels_last": _channels_last(cfg),
            "fast_postprocess": cfg.MODEL.RETINA_FOCAL.FAST_POSTPROCESS,
            "unmatched_gt_warn_fraction": cfg.MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION,
            "crowd_ignore_ioa": cfg.MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def forward(self, batched_inputs: List[Dict]):
        """``DenseDetector.forward`` (steps 1–5 of the module docstring), after checking the
        training inputs, and in eval mode under ``TEST.AMP``'s autocast.

        Args:
            batched_inputs (list[dict]): per image, "image" (C, H, W) in the input format,
                "instances" (training) and optionally "height"/"width" (output size).

        Returns:
            training: dict with "loss_cls" and "loss_box_reg" scalars;
            inference: list of {"instances": Instances} at the requested output size.
        """
        if self.training:
            check_training_inputs(batched_inputs, self.num_classes)
        with self._autocast():
            return super().forward(batched_inputs)

    def _autocast(self):
        """``TEST.AMP``'s autocast in eval mode; in training nothing (the trainer decides)."""
        return autocast(self.device.type, None if self.training else self.inference_dtype)

    def dense_outputs(
        self, features: List[Tensor], predictions: Sequence[List[Tensor]]
    ) -> Tuple[List[Boxes], List[Tensor], List[Tensor]]:
        """The anchors of ``features`` and the head's (logits, deltas), per level, from
        (N, A*K, Hi, Wi) to (N, HiWiA, K) and from (N, A*4, Hi, Wi) to (N, HiWiA, 4), in
        float32 whatever dtype the head ran in (losses and post-processing need it)."""
        anchors = self.anchor_generator(features)
        logits, deltas = self._transpose_dense_predictions(predictions, [self.num_classes, 4])
        return anchors, [x.float() for x in logits], [x.float() for x in deltas]

    def forward_training(self, images: ImageList, features, predictions, gt_instances: List[Instances]):
        anchors, logits, deltas = self.dense_outputs(features, predictions)
        assignment = self.label_anchors(anchors, drop_empty_boxes(gt_instances))
        self.log_assignment(assignment, anchors)
        return self.losses(anchors, logits, deltas, assignment)

    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]) -> AnchorAssignment:
        """Every anchor labelled with a class, background or "ignore" by the §4 IoU rule.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            gt_instances (list[Instances]): per image, ``gt_boxes`` and ``gt_classes`` (and
                crowd regions as ``gt_ignore`` rows, ignored with ``CROWD_IGNORE_IOA``).

        Returns:
            AnchorAssignment: labels (N, R) with R = sum(Hi*Wi*A), matched boxes (N, R, 4)
            and indices (N, R), and per box its best anchor IoU and foreground count.
        """
        return assign_anchors(Boxes.cat(anchors), gt_instances, self.anchor_matcher, self.num_classes, self.crowd_ignore_ioa)

    def losses(
        self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor], assignment: AnchorAssignment
    ) -> Dict[str, Tensor]:
        """Classification loss (registry) and box loss, both divided by the (smoothed)
        foreground count, which this updates (§4.1).

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4).
            assignment (AnchorAssignment): from :meth:`label_anchors`.
        """
        num_fg = assignment.foreground.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_fg / assignment.labels.shape[0])
        return self.losses_of_levels(anchors, logits, deltas, assignment, self._update_loss_normalizer(num_fg))

    def losses_of_levels(
        self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor], assignment: AnchorAssignment, normalizer: float
    ) -> Dict[str, Tensor]:
        """:meth:`loss_terms` over the anchors of every level (per-level lists concatenated:
        (R, 4), (N, R, K), (N, R, 4)); no state changes."""
        return self.loss_terms(Boxes.cat(anchors).tensor, cat(logits, dim=1), cat(deltas, dim=1), assignment, normalizer)

    def loss_terms(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, assignment: AnchorAssignment, normalizer: float
    ) -> Dict[str, Tensor]:
        """Both losses for R anchors, divided by ``normalizer``; no state changes.

        Args:
            anchors (Tensor): (R, 4); logits (Tensor): (N, R, K); deltas (Tensor): (N, R, 4);
            assignment (AnchorAssignment): of these R anchors.
        """
        with full_precision(self.device.type):  # float32 under any autocast
            loss_cls = self.cls_loss(logits, assignment.labels, normalizer, anchors=anchors)
            loss_box_reg = box_regression_loss(
                anchors,
                deltas,
                assignment.matched_boxes,
                assignment.foreground,
                self.box2box_transform,
                self.box_reg_loss_type,
                self.smooth_l1_beta,
            )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}

    def _update_loss_normalizer(self, num_fg: int) -> float:
        """EMA of max(#foreground, 1): §4.1's normalizer, smoothed for small batches."""
        m = self.loss_normalizer_momentum
        value = m * self.loss_normalizer.item() + (1 - m) * max(num_fg, 1)
        self.loss_normalizer.fill_(value)
        return value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """detectron2's RetinaNet checkpoints (and ours before the normalizer was saved with the
        weights) have no ``loss_normalizer``: it then keeps its start value, and is not missing."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "loss_normalizer"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def forward_inference(self, images: ImageList, features, predictions) -> List[Instances]:
        anchors, logits, deltas = self.dense_outputs(features, predictions)
        return self.inference(anchors, logits, deltas, images.image_sizes)

    @torch.no_grad()
    def inference(
        self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Detections of each image (:meth:`detections`, or the same computed faster with
        ``FAST_POSTPROCESS``); boxes are in the (resized) input frame.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4).
            image_sizes (list[(int, int)]): (h, w) of each image before padding.
        """
        results = []
        for i, image_size in enumerate(image_sizes):
            logits_i, deltas_i = [x[i] for x in logits], [x[i] for x in deltas]
            if self.fast_postprocess:
                results.append(
                    fast_detections(anchors, logits_i, deltas_i, image_size, self.inference_settings, self.box2box_transform)
                )
            else:
                results.append(self.detections(anchors, logits_i, deltas_i, image_size))
        return results

    def detections(
        self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor], image_size: Tuple[int, int]
    ) -> Instances:
        """§4.1 "Inference" for one image, as detectron2's RetinaNet computes it: per level,
        scores σ(logit) above the threshold, the top ``topk_candidates`` of them decoded;
        all levels merged, NMS, the ``max_detections`` best kept.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (HiWiA, K) and (HiWiA, 4).
        """
        s = self.inference_settings
        with full_precision(self.device.type):
            thresh = torch.tensor(s.score_thresh, device=self.device) if isinstance(s.score_thresh, tuple) else s.score_thresh
            scores = [x.sigmoid() for x in logits]
            found = self._decode_multi_level_predictions(anchors, scores, deltas, thresh, s.topk_candidates, image_size)
            boxes = found.pred_boxes.tensor
            if s.class_agnostic_nms:
                keep = nms(boxes, found.scores, s.nms_thresh)
            else:
                keep = batched_nms(boxes, found.scores, found.pred_classes, s.nms_thresh)
            return found[keep[: s.max_detections]]

    # ------------------------------------------------------------------ diagnostics, export

    def log_assignment(self, assignment: AnchorAssignment, anchors: List[Boxes]) -> None:
        """The ``assign/*`` metrics of a training batch (retina_focal.diagnostics.assignment);
        warn once if too many boxes have no anchor at the foreground IoU."""
        storage = get_event_storage()
        fg_iou = foreground_iou_threshold(self.anchor_matcher)
        counts = log_assignment_metrics(storage, assignment, [len(a) for a in anchors], self.head_in_features, fg_iou)
        if not self._warned_unmatched_gt:
            self._warned_unmatched_gt = warn_if_anchors_miss_boxes(
                counts, fg_iou, self.unmatched_gt_warn_fraction, storage.iter
            )

    def predict(self, images: ImageList) -> Tuple[List[Boxes], List[Tensor], List[Tensor]]:
        """Backbone, head and anchors of preprocessed ``images`` (steps 2–3 of ``forward``,
        under the same autocast), for export and diagnostics.

        Returns:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4), float32.
        """
        with self._autocast():
            features = self.backbone(images.tensor)
            features = [features[f] for f in self.head_in_features]
            predictions = self.head(features)
        return self.dense_outputs(features, predictions)

    @torch.no_grad()
    def labelled_predictions(
        self, batched_inputs: List[Dict]
    ) -> Tuple[List[Boxes], List[Tensor], List[Tensor], AnchorAssignment]:
        """:meth:`predict` and :meth:`label_anchors` of a batch with "instances" (checked
        as in training), without gradient and without changing any state."""
        check_training_inputs(batched_inputs, self.num_classes)
        anchors, logits, deltas = self.predict(self.preprocess_image(batched_inputs))
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return anchors, logits, deltas, self.label_anchors(anchors, drop_empty_boxes(gt_instances))

    @torch.no_grad()
    def loss_per_level(self, batched_inputs: List[Dict]) -> Dict[str, Dict[str, float]]:
        """Diagnostics: each loss term on each level's anchors alone, with the current
        normalizer; no state changes. Returns ``{term: {level name: value}}``."""
        anchors, logits, deltas, assignment = self.labelled_predictions(batched_inputs)
        per_level: Dict[str, Dict[str, float]] = {}
        start = 0
        for name, a, lg, dl in zip(self.head_in_features, anchors, logits, deltas):
            end = start + len(a)
            terms = self.loss_terms(a.tensor, lg, dl, assignment.anchors_in(start, end), self.loss_normalizer.item())
            for term, value in terms.items():
                per_level.setdefault(term, {})[name] = value.item()
            start = end
        return per_level
