"""Per-class score thresholds tuned on a validation set (``tools/tune_thresholds.py``).

Per class, the detections of every image are matched to the ground truth at IoU ≥ 0.5 in
score order (each box at most once, as COCO and VOC match), giving precision and recall at
every score. The chosen threshold is the score that maximizes F1, or, with a target
precision, the lowest score at which precision reaches it (the most recall at that
precision). The result is a ``MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH`` line and a JSON file
that ``retina-focal-predict`` reads beside the weights (:data:`THRESHOLDS_FILE`).
"""
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.structures import Boxes, pairwise_iou

from retina_focal.diagnostics.error_analysis import ImageBoxes

__all__ = ["DEFAULT_THRESHOLD", "THRESHOLDS_FILE", "ClassThreshold", "read_thresholds", "scores_at_threshold", "tune_thresholds", "write_thresholds"]

THRESHOLDS_FILE = "class_thresholds.json"  # beside MODEL.WEIGHTS; retina-focal-predict reads it
MATCH_IOU = 0.5
DEFAULT_THRESHOLD = 0.3  # retina-focal-predict's --confidence without a thresholds file

logger = logging.getLogger(__name__)


@dataclass
class ClassThreshold:
    """The chosen score threshold of one class and its precision, recall and F1 there."""

    name: str
    threshold: float
    precision: float
    recall: float
    f1: float
    num_ground_truth: int
    tuned: bool = True  # False: the class could not be tuned and keeps the default threshold


def _class_matches(ground_truth: Dict[int, ImageBoxes], detections: Dict[int, ImageBoxes], k: int):
    """(scores, true-positive flags) of class ``k``'s detections over all images, best first,
    and the number of its ground-truth boxes."""
    scores, hits, num_gt = [], [], 0
    for image_id in set(ground_truth) | set(detections):
        gt = ground_truth.get(image_id, ImageBoxes.empty())
        det = detections.get(image_id, ImageBoxes.empty())
        gt_boxes = gt.boxes[gt.classes == k]
        mine = det.classes == k
        det_boxes, det_scores = det.boxes[mine], det.scores[mine]
        num_gt += len(gt_boxes)
        order = det_scores.argsort(descending=True)
        iou = pairwise_iou(Boxes(det_boxes[order]), Boxes(gt_boxes))  # (D, G)
        free = torch.ones(len(gt_boxes), dtype=torch.bool)
        for row in iou:
            candidates = torch.where(free & (row >= MATCH_IOU), row, torch.full_like(row, -1.0))
            hit = bool(len(row)) and bool(candidates.max() >= MATCH_IOU)
            if hit:
                free[candidates.argmax()] = False
            hits.append(hit)
        scores.append(det_scores[order])
    scores = torch.cat(scores) if scores else torch.zeros(0)
    order = scores.argsort(descending=True, stable=True)
    return scores[order], torch.tensor(hits, dtype=torch.bool)[order] if hits else torch.zeros(0, dtype=torch.bool), num_gt


def _class_curve(ground_truth: Dict[int, ImageBoxes], detections: Dict[int, ImageBoxes], k: int):
    """Class ``k``'s (scores, precision, recall, F1) after each of its detections, best first
    (each (D,)), and its number of ground-truth boxes."""
    scores, hits, num_gt = _class_matches(ground_truth, detections, k)
    tp = hits.cumsum(0).float()
    precision = tp / torch.arange(1, len(hits) + 1)
    recall = tp / max(num_gt, 1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return scores, precision, recall, f1, num_gt


def tune_thresholds(
    ground_truth: Dict[int, ImageBoxes],
    detections: Dict[int, ImageBoxes],
    class_names: Sequence[str],
    target_precision: Optional[float] = None,
    default: float = DEFAULT_THRESHOLD,
) -> List[ClassThreshold]:
    """One :class:`ClassThreshold` per class (module docstring). A class that cannot be tuned
    (no box of it in the set, no detection of it matching one, or the target precision never
    reached) keeps ``default`` (``tuned`` False), with a warning: a threshold of 1.0 would
    remove the class from every later prediction."""
    out = []
    for k, name in enumerate(class_names):
        scores, precision, recall, f1, num_gt = _class_curve(ground_truth, detections, k)
        if target_precision is None:
            candidates = f1
        else:
            candidates = torch.where(precision >= target_precision, recall, torch.full_like(recall, -1.0))
        if len(candidates) == 0 or candidates.max() <= 0:
            why = "no box of it in the tuning set" if num_gt == 0 else "no detection of it matches a box at the criterion"
            logger.warning(f"class {name!r} cannot be tuned ({why}): it keeps the default threshold {default}")
            out.append(ClassThreshold(name, default, 0.0, 0.0, 0.0, num_gt, tuned=False))
            continue
        best = int(candidates.argmax())  # the first (highest-score) detection where the criterion peaks
        out.append(ClassThreshold(name, float(scores[best]), float(precision[best]), float(recall[best]), float(f1[best]), num_gt))
    return out


def scores_at_threshold(
    ground_truth: Dict[int, ImageBoxes], detections: Dict[int, ImageBoxes], class_names: Sequence[str], threshold: float
) -> List[ClassThreshold]:
    """Precision, recall and F1 of every class when one ``threshold`` serves all classes (what
    tuning is compared with; retina-focal-predict's default is 0.3)."""
    out = []
    for k, name in enumerate(class_names):
        scores, precision, recall, f1, num_gt = _class_curve(ground_truth, detections, k)
        kept = int((scores >= threshold).sum())  # scores are sorted, best first
        if kept == 0:
            out.append(ClassThreshold(name, threshold, 0.0, 0.0, 0.0, num_gt))
            continue
        out.append(ClassThreshold(name, threshold, float(precision[kept - 1]), float(recall[kept - 1]), float(f1[kept - 1]), num_gt))
    return out


def write_thresholds(thresholds: Sequence[ClassThreshold], path: str, criterion: str) -> str:
    """The JSON that ``retina-focal-predict`` reads: class names, thresholds, how chosen."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"criterion": criterion, "classes": [asdict(t) for t in thresholds]}, f, indent=2)
    return path


def read_thresholds(path: str, class_names: Sequence[str]) -> List[float]:
    """The thresholds of ``path`` in the order of ``class_names``; a ValueError if the file
    was tuned for other classes. A threshold of 1 or more (files of older versions gave it to
    classes they could not tune) is warned about: that class is never predicted."""
    with open(path) as f:
        classes = json.load(f)["classes"]
    names = [c["name"] for c in classes]
    if names != list(class_names):
        raise ValueError(f"{path} holds thresholds for the classes {names}, the model has {list(class_names)}")
    never = [c["name"] for c in classes if float(c["threshold"]) >= 1.0]
    if never:
        logger.warning(f"{path}: the classes {never} have a threshold of 1 or more and will never be predicted; "
                       "tune again (tools/tune_thresholds.py) or pass --confidence")
    return [float(c["threshold"]) for c in classes]
