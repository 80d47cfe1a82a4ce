"""RetinaFocal: the one-stage detector of §4 (Figure 3).

preprocess → backbone (ResNet-FPN, P3–P7) → anchors → head (class + box subnets) and then

* training: label anchors with the §4 IoU rule, classification loss from the registry
  (the focal loss by default) + box regression loss, both normalized by the number of
  foreground anchors (§4.1);
* inference (§4.1 "Inference"): per level, scores thresholded at 0.05 and at most 1000
  top-scoring candidates decoded; levels merged; class-wise NMS at 0.5; top 100 kept.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat, move_device_like, nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import Tensor, nn

from .config import warn_ignored_settings
from .data.checks import check_gt_instances
from .diagnostics.assignment import (
    foreground_iou_threshold,
    gt_assignment,
    log_assignment_metrics,
    warn_if_anchors_miss_boxes,
)
from .head import build_retina_focal_head
from .losses import BOX_REG_LOSS_TYPES, box_regression_loss, build_retina_focal_loss
from .matching import build_anchor_matcher
from .precision import amp_dtype, autocast, full_precision

__all__ = ["RetinaFocal"]

logger = logging.getLogger(__name__)


def _drop_empty_boxes(gt_instances: List[Instances]) -> List[Instances]:
    """Remove boxes of zero width or height, as detectron2's DatasetMapper does (a box that
    overlaps no anchor would make the matcher's low-quality rule mark every anchor foreground).
    One device synchronization per batch."""
    keeps = [x.gt_boxes.nonempty() for x in gt_instances]
    num_dropped = int(sum((~keep).sum() for keep in keeps))
    if num_dropped == 0:
        return gt_instances
    log_first_n(logging.WARNING, f"Dropped {num_dropped} ground-truth box(es) of zero area", n=5)
    return [x[keep] for x, keep in zip(gt_instances, keeps)]


def _check_score_thresholds(thresh: Union[float, Sequence[float]], num_classes: int) -> Union[float, Tuple[float, ...]]:
    """The score threshold(s) of inference: a float, or one per class (config errors name the key)."""
    if isinstance(thresh, (int, float)):
        _check_probabilities((thresh,), "MODEL.RETINANET.SCORE_THRESH_TEST", thresh)
        return float(thresh)
    values = tuple(float(t) for t in thresh)
    key = "MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH"
    if len(values) != num_classes:
        raise ValueError(
            f"{key} must have one threshold per class (MODEL.RETINANET.NUM_CLASSES = {num_classes}), "
            f"got {len(values)}: {list(values)}"
        )
    _check_probabilities(values, key, thresh)
    return values


def _check_probabilities(values: Sequence[float], key: str, given) -> None:
    if not all(0.0 <= t < 1.0 for t in values):
        raise ValueError(f"{key} must be in [0, 1), got {given}")


def _topk(values: Tensor, k: int, chunks: int = 16) -> Tuple[Tensor, Tensor]:
    """``values.topk(k)`` of a long 1-D tensor as the top k of ``chunks`` per-chunk top-ks: the
    same elements (the best k are among the best k of their chunks) in sorted order, and the
    chunks run in parallel (one 1-D top-k uses one CPU thread)."""
    n = values.numel()
    if n < 4 * chunks * k:
        return values.topk(k)
    chunk = -(-n // chunks)
    padded = torch.cat([values, values.new_full((chunk * chunks - n,), -math.inf)])
    top, idx = padded.view(chunks, chunk).topk(k, dim=1)  # (chunks, k)
    idx = idx + torch.arange(chunks, device=values.device).unsqueeze(1) * chunk
    top, order = top.flatten().topk(k)
    return top, idx.flatten()[order]


@META_ARCH_REGISTRY.register()
class RetinaFocal(nn.Module):
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
        channels_last: bool = True,
        inference_dtype: Optional[torch.dtype] = None,
        unmatched_gt_warn_fraction: float = 0.5,
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
            channels_last (bool): run backbone and head in the channels-last (NHWC) memory
                format (same weights and checkpoints; float rounding differs).
            inference_dtype (torch.dtype or None): in eval mode, run backbone and head under
                ``torch.autocast(device, inference_dtype)`` (``TEST.AMP``). None: open no
                autocast, so one opened by the caller (e.g. the AMP trainer's) applies. Losses
                and post-processing run in float32 under any autocast.
            unmatched_gt_warn_fraction (float): warn (once) when more than this share of a
                training batch's boxes has no anchor with the foreground IoU (in [0, 1]).
            pixel_mean, pixel_std: per-channel input normalization.
        """
        super().__init__()
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, got {box_reg_loss_type!r}"
            )
        if not 0.0 <= loss_normalizer_momentum < 1.0:
            raise ValueError(
                "MODEL.RETINA_FOCAL.LOSS_NORMALIZER_MOMENTUM must be in [0, 1), got "
                f"{loss_normalizer_momentum}"
            )
        self.backbone = backbone
        self.head = head
        self.head_in_features = list(head_in_features)
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.num_classes = num_classes
        self.cls_loss = cls_loss
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalizer_momentum = loss_normalizer_momentum
        # Running number of foreground anchors per batch; 100 is detectron2's start value.
        self.loss_normalizer = 100.0
        self.test_score_thresh = _check_score_thresholds(test_score_thresh, num_classes)
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.class_agnostic_nms = class_agnostic_nms
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.inference_dtype = inference_dtype
        self.unmatched_gt_warn_fraction = unmatched_gt_warn_fraction
        self._warned_unmatched_gt = False
        # per box of the last labelled batch: best anchor IoU, foreground anchors (label_anchors)
        self.last_gt_assignment: Tuple[Tensor, Tensor] = (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        self.backbone.to(memory_format=self.memory_format)
        self.head.to(memory_format=self.memory_format)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        warn_ignored_settings(cfg)
        backbone = build_backbone(cfg)
        produced = backbone.output_shape()
        in_features = cfg.MODEL.RETINANET.IN_FEATURES
        missing = [f for f in in_features if f not in produced]
        if missing:
            raise ValueError(
                f"MODEL.RETINANET.IN_FEATURES names {missing}, which the backbone "
                f"({cfg.MODEL.BACKBONE.NAME}) does not produce; it produces {sorted(produced)}"
            )
        feature_shapes: List[ShapeSpec] = [produced[f] for f in in_features]
        return {
            "backbone": backbone,
            "head": build_retina_focal_head(cfg, feature_shapes),
            "head_in_features": in_features,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS),
            # §4: IoU >= 0.5 foreground, < 0.4 background, in between ignored; each
            # ground-truth box also keeps its best anchors (low-quality matches, as in RPN).
            "anchor_matcher": build_anchor_matcher(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                every_gt=cfg.MODEL.RETINA_FOCAL.MATCH_EVERY_GT,
            ),
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
            "channels_last": cfg.MODEL.RETINA_FOCAL.CHANNELS_LAST,
            "inference_dtype": (
                amp_dtype(cfg.TEST.AMP.PRECISION, cfg.MODEL.DEVICE, "TEST.AMP.PRECISION") if cfg.TEST.AMP.ENABLED else None
            ),
            "unmatched_gt_warn_fraction": cfg.MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs (list[dict]): per image, "image" (C, H, W) in the input format,
                "instances" (training) and optionally "height"/"width" (output size).

        Returns:
            training: dict with "loss_cls" and "loss_box_reg" scalars;
            inference: list of {"instances": Instances} at the requested output size.
        """
        images = self.preprocess_image(batched_inputs)
        anchors, logits, deltas = self.predict(images)
        if self.training:
            gt_labels, gt_boxes = self.label_batch(batched_inputs, anchors)
            return self.losses(anchors, logits, deltas, gt_labels, gt_boxes)
        results = self.inference(anchors, logits, deltas, images.image_sizes)
        return self.postprocess(results, batched_inputs, images.image_sizes)

    @staticmethod
    def postprocess(results: List[Instances], batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]):
        """Rescale detections to each input's "height"/"width" (default: its size) and clip."""
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, image_sizes)
        ]

    def predict(self, images: ImageList) -> Tuple[List[Boxes], List[Tensor], List[Tensor]]:
        """Backbone, head and anchors; in eval mode under ``TEST.AMP``'s autocast if enabled,
        and always under any autocast the caller opened.

        Returns:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4), float32
                whatever dtype the head ran in (losses and post-processing need it).
        """
        with autocast(self.device.type, None if self.training else self.inference_dtype):
            features = self.backbone(images.tensor.contiguous(memory_format=self.memory_format))
            features = [features[f] for f in self.head_in_features]
            logits, deltas = self.head(features)
        logits, deltas = [x.float() for x in logits], [x.float() for x in deltas]
        return self.dense_outputs(features, logits, deltas)

    def dense_outputs(
        self, features: List[Tensor], logits: List[Tensor], deltas: List[Tensor]
    ) -> Tuple[List[Boxes], List[Tensor], List[Tensor]]:
        """The anchors of ``features`` and the head's outputs, per level, reshaped from
        (N, A*K, Hi, Wi) to (N, HiWiA, K) and from (N, A*4, Hi, Wi) to (N, HiWiA, 4)."""
        anchors = self.anchor_generator(features)
        logits = [permute_to_N_HWA_K(x, self.num_classes) for x in logits]  # (N, HiWiA, K)
        deltas = [permute_to_N_HWA_K(x, 4) for x in deltas]  # (N, HiWiA, 4)
        return anchors, logits, deltas

    def label_batch(self, batched_inputs: List[Dict], anchors: List[Boxes]) -> Tuple[Tensor, Tensor]:
        """Check the batch's ground truth and label the anchors (:meth:`label_anchors`)."""
        if "instances" not in batched_inputs[0]:
            raise ValueError("RetinaFocal is in training mode but the inputs have no 'instances'")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        check_gt_instances(gt_instances, self.num_classes, batched_inputs)
        return self.label_anchors(anchors, _drop_empty_boxes(gt_instances))

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize, pad to the backbone's size divisibility and batch the images."""
        images = [move_device_like(x["image"], self.pixel_mean) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]) -> Tuple[Tensor, Tensor]:
        """Assign every anchor a class, background or "ignore" by the §4 IoU rule.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            gt_instances (list[Instances]): per image, ``gt_boxes`` and ``gt_classes``.

        Returns:
            gt_labels (Tensor): (N, R), R = sum(Hi*Wi*A): a class in [0, K) for foreground,
                K for background, -1 for ignored anchors.
            matched_gt_boxes (Tensor): (N, R, 4) the matched box (meaningful where foreground).

        Also sets ``last_gt_assignment``: each box's best anchor IoU and number of foreground
        anchors, (B,) and (B,) over the batch's B boxes, which :meth:`losses` logs.
        """
        anchors = Boxes.cat(anchors)  # (R, 4)
        gt_labels, matched_gt_boxes, per_gt = [], [], []
        for instances in gt_instances:  # images differ in their number of boxes
            iou = pairwise_iou(instances.gt_boxes, anchors)  # (G, R)
            matched_idxs, anchor_labels = self.anchor_matcher(iou)  # (R,), (R,) in {-1, 0, 1}
            per_gt.append(gt_assignment(iou, matched_idxs, anchor_labels))  # (G,), (G,)
            if len(instances) > 0:
                labels = instances.gt_classes[matched_idxs]
                boxes = instances.gt_boxes.tensor[matched_idxs]
                labels = torch.where(anchor_labels == 0, torch.full_like(labels, self.num_classes), labels)
                labels = torch.where(anchor_labels == -1, torch.full_like(labels, -1), labels)
            else:  # no objects: every anchor is background, whatever IOU_LABELS says
                labels = torch.full_like(matched_idxs, self.num_classes)
                boxes = torch.zeros_like(anchors.tensor)
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        best_iou, num_fg = zip(*per_gt)
        self.last_gt_assignment = (torch.cat(best_iou), torch.cat(num_fg))  # (B,), (B,)
        return torch.stack(gt_labels), torch.stack(matched_gt_boxes)

    def losses(
        self,
        anchors: List[Boxes],
        logits: List[Tensor],
        deltas: List[Tensor],
        gt_labels: Tensor,
        gt_boxes: Tensor,
    ) -> Dict[str, Tensor]:
        """Classification loss (registry) and box loss, both divided by the foreground count.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4).
            gt_labels, gt_boxes: from :meth:`label_anchors`, (N, R) and (N, R, 4).
        """
        num_fg = self.foreground_mask(gt_labels).sum().item()
        storage = get_event_storage()
        storage.put_scalar("num_pos_anchors", num_fg / gt_labels.shape[0])
        self._log_assignment(storage, gt_labels, [len(a) for a in anchors])
        normalizer = self._update_loss_normalizer(num_fg)
        anchors = Boxes.cat(anchors).tensor  # (R, 4)
        return self.loss_terms(anchors, cat(logits, dim=1), cat(deltas, dim=1), gt_labels, gt_boxes, normalizer)

    def _log_assignment(self, storage, gt_labels: Tensor, level_sizes: List[int]) -> None:
        """The ``assign/*`` metrics of the batch (retina_focal.diagnostics.assignment); warn
        once if too many boxes have no anchor at the foreground IoU."""
        fg_iou = foreground_iou_threshold(self.anchor_matcher)
        counts = log_assignment_metrics(
            storage, self.foreground_mask(gt_labels), level_sizes, self.head_in_features, *self.last_gt_assignment, fg_iou
        )
        if not self._warned_unmatched_gt:
            self._warned_unmatched_gt = warn_if_anchors_miss_boxes(
                counts, fg_iou, self.unmatched_gt_warn_fraction, storage.iter
            )

    def foreground_mask(self, gt_labels: Tensor) -> Tensor:
        """(N, R) bool: anchors labelled with a class (not background K, not ignored -1)."""
        return (gt_labels >= 0) & (gt_labels != self.num_classes)

    def loss_terms(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt_labels: Tensor, gt_boxes: Tensor, normalizer: float
    ) -> Dict[str, Tensor]:
        """Both losses for R anchors, divided by ``normalizer``.

        Args:
            anchors (Tensor): (R, 4); logits (Tensor): (N, R, K); deltas (Tensor): (N, R, 4);
            gt_labels (Tensor): (N, R); gt_boxes (Tensor): (N, R, 4).
        """
        with full_precision(self.device.type):  # float32 under any autocast
            loss_cls = self.cls_loss(logits, gt_labels, normalizer, anchors=anchors)
            loss_box_reg = box_regression_loss(
                anchors,
                deltas,
                gt_boxes,
                self.foreground_mask(gt_labels),
                self.box2box_transform,
                self.box_reg_loss_type,
                self.smooth_l1_beta,
            )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}

    @torch.no_grad()
    def loss_per_level(self, batched_inputs: List[Dict]) -> Dict[str, Dict[str, float]]:
        """Diagnostics: each loss term on each level's anchors alone, with the current
        normalizer; no state changes. Returns ``{term: {level name: value}}``."""
        images = self.preprocess_image(batched_inputs)
        anchors, logits, deltas = self.predict(images)
        gt_labels, gt_boxes = self.label_batch(batched_inputs, anchors)
        per_level: Dict[str, Dict[str, float]] = {}
        start = 0
        for name, a, lg, dl in zip(self.head_in_features, anchors, logits, deltas):
            end = start + len(a)
            terms = self.loss_terms(a.tensor, lg, dl, gt_labels[:, start:end], gt_boxes[:, start:end], self.loss_normalizer)
            for term, value in terms.items():
                per_level.setdefault(term, {})[name] = value.item()
            start = end
        return per_level

    def _update_loss_normalizer(self, num_fg: int) -> float:
        """EMA of max(#foreground, 1): §4.1's normalizer, smoothed for small batches."""
        m = self.loss_normalizer_momentum
        self.loss_normalizer = m * self.loss_normalizer + (1 - m) * max(num_fg, 1)
        return self.loss_normalizer

    @torch.no_grad()
    def inference(
        self,
        anchors: List[Boxes],
        logits: List[Tensor],
        deltas: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """§4.1 "Inference" for each image; boxes are in the (resized) input frame.

        Scores are thresholded and ranked as logits (σ is monotonic), so the sigmoid is only
        computed for the detections that are returned.

        Args:
            anchors (list[Boxes]): per level (HiWiA, 4).
            logits, deltas (list[Tensor]): per level (N, HiWiA, K) and (N, HiWiA, 4).
            image_sizes (list[(int, int)]): (h, w) of each image before padding.
        """
        with full_precision(self.device.type):  # float32 under any autocast
            return [self._inference_single_image(anchors, logits, deltas, i, size) for i, size in enumerate(image_sizes)]

    def _inference_single_image(
        self, anchors: List[Boxes], logits: List[Tensor], deltas: List[Tensor], i: int, image_size: Tuple[int, int]
    ) -> Instances:
        """Image ``i``'s detections (arguments as in :meth:`inference`)."""
        logit_thresh = torch.logit(torch.as_tensor(self.test_score_thresh, dtype=logits[0].dtype, device=self.device))
        candidates = [
            self._decode_level(a.tensor, lg[i], dl[i], logit_thresh) for a, lg, dl in zip(anchors, logits, deltas)
        ]
        boxes, scores, classes = (cat(parts) for parts in zip(*candidates))
        keep = self._first_kept_by_nms(boxes, scores, classes)
        return Instances(
            image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep].sigmoid(), pred_classes=classes[keep]
        )

    def _decode_level(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, logit_thresh: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Threshold, keep the top-k (anchor, class) pairs of one level, decode their boxes.

        Args:
            anchors (Tensor): (HWA, 4); logits (Tensor): (HWA, K); deltas (Tensor): (HWA, 4);
            logit_thresh (Tensor): () or (K,), σ^-1 of the score threshold(s).

        Returns:
            boxes (M, 4), logits (M,), classes (M,) with M ≤ test_topk_candidates.
        """
        passing = logits > logit_thresh  # (HWA, K)
        if int(passing.sum()) > self.test_topk_candidates:  # top-k of the passing scores, no index list
            scores, flat = _topk(torch.where(passing, logits, -math.inf).flatten(), self.test_topk_candidates)
            anchor_idxs, classes = flat // self.num_classes, flat % self.num_classes
        else:  # thresholding first: few candidates, no top-k needed (NMS sorts)
            anchor_idxs, classes = torch.nonzero(passing, as_tuple=True)
            scores = logits[anchor_idxs, classes]
        boxes = self.box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs])
        return boxes, scores, classes

    def _first_kept_by_nms(self, boxes: Tensor, scores: Tensor, classes: Tensor) -> Tensor:
        """Indices of the ``max_detections_per_image`` best boxes that survive NMS (class-wise
        at ``test_nms_thresh``, or over all classes), best first.

        Exact and cheaper than NMS over all candidates: greedy NMS decides a box from the
        better boxes only, so NMS over the C best candidates keeps the same first boxes as
        NMS over all of them; C starts at 4x the detections wanted and doubles until enough
        survive or every candidate is in.
        """
        order = scores.argsort(descending=True)
        num_candidates = min(len(order), 4 * self.max_detections_per_image)
        while True:
            top = order[:num_candidates]
            if self.class_agnostic_nms:
                keep = nms(boxes[top], scores[top], self.test_nms_thresh)
            else:
                keep = batched_nms(boxes[top], scores[top], classes[top], self.test_nms_thresh)
            if len(keep) >= self.max_detections_per_image or num_candidates == len(order):
                return top[keep[: self.max_detections_per_image]]
            num_candidates = min(len(order), 2 * num_candidates)
