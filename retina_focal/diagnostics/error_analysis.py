"""Error analysis of a detector's results on a dataset, after COCO evaluation.

Inputs: a registered dataset (its ground truth) and detections, as the COCO results JSON
that COCOEvaluator writes (``coco_instances_results.json``: image_id, category_id in the
dataset's ids, XYWH bbox, score). Outputs:

* per-class AP (COCO AP@[.5:.95], pycocotools, the "AP-<class>" of COCOEvaluator), worst
  first, and the precision–recall curves per class and overall (mean over classes, as
  COCO's AP averages them), from COCOeval's accumulated precision (101 recall points,
  area "all", 100 detections per image);
* at one score threshold, a confusion matrix and a breakdown of the false positives.

Definitions used at the score threshold (crowd boxes are left out):

* **true positive**: per class, detections by decreasing score each take the unmatched
  ground-truth box of their class with the highest IoU ≥ ``MATCH_IOU`` (0.5), as COCOeval
  does at IoU 0.5;
* **confusion matrix** (rows: ground-truth class, then "background" = no box; columns:
  detected class, then "missed" = no detection): the diagonal holds the true positives;
  the remaining detections, by decreasing score, each take the unmatched box of another
  class with the highest IoU ≥ ``MATCH_IOU`` (entry [its class, detected class]); boxes
  left unmatched are "missed", detections left unmatched are "background";
* **false-positive types** (classic detection error analysis, Hoiem et al. 2012), for each
  detection that is not a true positive: **localization** if its IoU with some box of its
  own class is ≥ ``NEAR_IOU`` (0.1; duplicates of a detected box land here), else
  **confusion** if its IoU with a box of another class is ≥ ``NEAR_IOU``, else
  **background**.
"""
import contextlib
import io
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "FP_TYPES",
    "ImageBoxes",
    "MatchSummary",
    "coco_evaluation",
    "confusion_table",
    "detections_from_coco_results",
    "ground_truth_boxes",
    "load_coco_results",
    "match_detections",
    "per_class_ap",
    "precision_recall",
]

MATCH_IOU = 0.5  # a detection counts for a box from this IoU (COCO AP50)
NEAR_IOU = 0.1  # Hoiem et al.: "localization" / "confusion" false positives overlap a box by this much
FP_TYPES = ("localization", "confusion", "background")


@dataclass
class ImageBoxes:
    """Boxes of one image: ``boxes`` (n, 4) XYXY, ``classes`` (n,) contiguous ids in [0, K),
    ``scores`` (n,) (ones for ground truth)."""

    boxes: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor

    @staticmethod
    def empty() -> "ImageBoxes":
        return ImageBoxes(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))


def _contiguous_ids(dataset_name: str) -> Dict[int, int]:
    """Dataset category id -> contiguous id (identity if the dataset has no mapping)."""
    DatasetCatalog.get(dataset_name)  # load_coco_json sets the mapping on first load
    metadata = MetadataCatalog.get(dataset_name)
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    return dict(mapping) if mapping else {i: i for i in range(len(metadata.thing_classes))}


def ground_truth_boxes(dataset_name: str) -> Dict[int, ImageBoxes]:
    """Non-crowd ground truth of a registered dataset, by image id."""
    out = {}
    for d in DatasetCatalog.get(dataset_name):
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        out[d["image_id"]] = ImageBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            torch.ones(len(anns)),
        )
    return out


def detections_from_coco_results(results: List[Dict], dataset_name: str) -> Dict[int, ImageBoxes]:
    """COCO results (dataset category ids, XYWH boxes) as contiguous-id XYXY boxes by image id."""
    to_contiguous = _contiguous_ids(dataset_name)
    per_image: Dict[int, List[Dict]] = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(r)
    out = {}
    for image_id, rs in per_image.items():
        xywh = torch.tensor([r["bbox"] for r in rs], dtype=torch.float32).reshape(-1, 4)  # (D, 4)
        out[image_id] = ImageBoxes(
            torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            torch.tensor([to_contiguous[r["category_id"]] for r in rs], dtype=torch.int64),
            torch.tensor([r["score"] for r in rs], dtype=torch.float32),
        )
    return out


def _coco_ground_truth(dataset_name: str) -> COCO:
    """The COCO api COCOEvaluator uses: the dataset's ``json_file``, else detectron2's conversion."""
    metadata = MetadataCatalog.get(dataset_name)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints
        if getattr(metadata, "json_file", None):
            return COCO(metadata.json_file)
        coco = COCO()
        coco.dataset = convert_to_coco_dict(dataset_name)
        coco.createIndex()
    return coco


def coco_evaluation(dataset_name: str, results: List[Dict]) -> COCOeval:
    """pycocotools' COCOeval of ``results`` on ``dataset_name`` (evaluated and accumulated),
    exactly as COCOEvaluator runs it for the "bbox" task."""
    with contextlib.redirect_stdout(io.StringIO()):
        return _evaluate_predictions_on_coco(_coco_ground_truth(dataset_name), results, "bbox", cocoeval_fn=COCOeval)


def per_class_ap(coco_eval: COCOeval, class_names: Sequence[str]) -> List[Tuple[str, float]]:
    """(class, AP in %) worst first; classes without ground truth (NaN) last.

    AP@[.5:.95] as detectron2's COCOEvaluator computes "AP-<class>": the mean of COCOeval's
    precision over IoU thresholds and recall points, area "all", 100 detections.
    """
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M), -1 where undefined
    rows = []
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        rows.append((name, float(np.mean(p)) * 100 if p.size else math.nan))
    return sorted(rows, key=lambda r: (math.isnan(r[1]), r[1]))


def precision_recall(coco_eval: COCOeval, iou: float = MATCH_IOU) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval's interpolated precision at one IoU threshold (area "all", 100 detections).

    Returns:
        recall (ndarray): (101,) 0, 0.01, …, 1.
        precision (ndarray): (K, 101); NaN where a class has no ground truth and beyond the
            highest recall it reaches (COCOeval stores 0 there).
        overall (ndarray): (101,) the mean over the classes with ground truth, zeros
            included: the curve whose mean is the AP at this IoU.
    """
    params = coco_eval.params
    t = int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou)))
    raw = coco_eval.eval["precision"][t, :, :, 0, -1].T.astype(float)  # (K, 101), -1: no ground truth
    has_gt = (raw > -1).any(axis=1)  # (K,)
    overall = raw[has_gt].mean(axis=0) if has_gt.any() else np.full(raw.shape[1], np.nan)
    recall = np.asarray(params.recThrs)
    reached = np.asarray(coco_eval.eval["recall"][t, :, 0, -1])  # (K,) highest recall of each class
    precision = np.where((raw < 0) | (recall[None, :] > reached[:, None] + 1e-9), np.nan, raw)
    return recall, precision, overall


@dataclass
class MatchSummary:
    """Counts at one score threshold over a dataset (module docstring for the definitions).

    Attributes:
        confusion (ndarray): (K + 1, K + 1) int; rows: ground-truth class, last = background;
            columns: detected class, last = missed.
        fp_types (ndarray): (K, 3) int; per detected class, false positives of each FP_TYPES.
        true_positives (ndarray): (K,) int.
    """

    confusion: np.ndarray
    fp_types: np.ndarray
    true_positives: np.ndarray


def _greedy_match(iou: torch.Tensor, allowed: torch.Tensor, det_free: torch.Tensor, gt_free: torch.Tensor) -> List[Tuple[int, int]]:
    """Free detections (rows, in score order) each take the free allowed box of highest
    IoU ≥ MATCH_IOU; returns the (detection, box) pairs.

    Args:
        iou (Tensor): (D, G); allowed (Tensor): (D, G) bool.
        det_free (Tensor): (D,) bool; gt_free (Tensor): (G,) bool; both updated in place.
    """
    pairs = []
    for d in torch.nonzero(det_free).flatten().tolist():
        candidates = iou[d].masked_fill(~(allowed[d] & gt_free), -1.0)  # (G,)
        if candidates.numel() and candidates.max() >= MATCH_IOU:
            g = int(candidates.argmax())
            det_free[d], gt_free[g] = False, False
            pairs.append((d, g))
    return pairs


def _match_image(gt: ImageBoxes, det: ImageBoxes, num_classes: int, summary: MatchSummary) -> None:
    """Add one image's counts to ``summary`` (detections already thresholded)."""
    order = det.scores.argsort(descending=True)
    det_classes = det.classes[order]  # (D,)
    iou = pairwise_iou(Boxes(det.boxes[order]), Boxes(gt.boxes))  # (D, G)
    same = det_classes[:, None] == gt.classes[None, :]  # (D, G)
    det_free = torch.ones(len(order), dtype=torch.bool)
    gt_free = torch.ones(len(gt.classes), dtype=torch.bool)
    true_pos = _greedy_match(iou, same, det_free, gt_free)
    confused = _greedy_match(iou, ~same, det_free, gt_free)
    background = num_classes  # last row (no box) and last column (missed)
    for d, g in true_pos + confused:
        summary.confusion[gt.classes[g], det_classes[d]] += 1
    np.add.at(summary.confusion, (gt.classes[gt_free].numpy(), background), 1)
    np.add.at(summary.confusion, (background, det_classes[det_free].numpy()), 1)
    is_fp = torch.ones(len(order), dtype=torch.bool)
    is_fp[torch.tensor([d for d, _ in true_pos], dtype=torch.int64)] = False
    np.add.at(summary.true_positives, det_classes[~is_fp].numpy(), 1)
    near = iou >= NEAR_IOU  # (D, G)
    fp_type = torch.where((near & same).any(dim=1), 0, torch.where((near & ~same).any(dim=1), 1, 2))  # FP_TYPES
    np.add.at(summary.fp_types, (det_classes[is_fp].numpy(), fp_type[is_fp].numpy()), 1)


def match_detections(
    ground_truth: Dict[int, ImageBoxes], detections: Dict[int, ImageBoxes], num_classes: int, score_thresh: float
) -> MatchSummary:
    """Confusion matrix, false-positive types and true positives of the detections scoring
    ≥ ``score_thresh`` (module docstring); images without detections count their boxes as missed.

    Args:
        ground_truth, detections: by image id (:func:`ground_truth_boxes`,
            :func:`detections_from_coco_results`); detections on images outside the
            ground truth are an error.
        num_classes (int): K; score_thresh (float): in [0, 1].
    """
    unknown = set(detections) - set(ground_truth)
    if unknown:
        raise ValueError(f"{len(unknown)} image id(s) of the detections are not in the dataset, e.g. {min(unknown)}")
    summary = MatchSummary(
        np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64),
        np.zeros((num_classes, len(FP_TYPES)), dtype=np.int64),
        np.zeros(num_classes, dtype=np.int64),
    )
    for image_id, gt in ground_truth.items():
        det = detections.get(image_id, ImageBoxes.empty())
        keep = det.scores >= score_thresh
        _match_image(gt, ImageBoxes(det.boxes[keep], det.classes[keep], det.scores[keep]), num_classes, summary)
    return summary


def load_coco_results(path: str) -> List[Dict]:
    """The list of result dicts of a COCO results JSON (``coco_instances_results.json``)."""
    with open(path) as f:
        return json.load(f)


def confusion_table(summary: MatchSummary, class_names: Sequence[str]) -> str:
    """The confusion matrix (rows: ground truth, columns: detections) and the false-positive
    types with their shares, as text."""
    cols = list(class_names) + ["missed"]
    width = max(10, *(len(c) + 2 for c in cols))
    lines = ["gt \\ det".ljust(12) + "".join(c.rjust(width) for c in cols)]
    for name, row in zip(list(class_names) + ["background"], summary.confusion):
        cells = row.tolist()
        if name == "background":
            cells = cells[:-1] + ["-"]
        lines.append(name.ljust(12) + "".join(str(v).rjust(width) for v in cells))
    totals = summary.fp_types.sum(axis=0)
    num_fp = int(totals.sum())
    lines.append("")
    lines.append(f"true positives {int(summary.true_positives.sum())}, false positives {num_fp}:")
    lines += [f"  {name:<13}{int(c):>6}  {c / max(num_fp, 1):6.1%}" for name, c in zip(FP_TYPES, totals)]
    return "\n".join(lines)
