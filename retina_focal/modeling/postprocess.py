"""§4.1 "Inference": the settings and the fast path of RetinaFocal's post-processing.

Per image: scores σ(logit) thresholded at 0.05, at most 1000 top-scoring candidates per FPN
level decoded, levels merged, class-wise NMS at 0.5, the 100 best kept
(:class:`InferenceSettings`, checked by :func:`check_score_thresholds`). Two paths compute it,
chosen by ``MODEL.RETINA_FOCAL.FAST_POSTPROCESS`` in :meth:`RetinaFocal.inference`:

* the plain path, :meth:`RetinaFocal.detections`: detectron2's decoding, bit for bit;
* :func:`fast_detections` (the default): thresholding and ranking on logits, a chunked
  top-k and NMS truncated exactly; the same detections up to float rounding
  (``tests/modeling/test_fast_layers.py``; the exactness of its top-k and NMS:
  ``tests/modeling/test_postprocess.py``).
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from detectron2.layers import batched_nms, cat, nms
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torch import Tensor

from retina_focal.modeling.precision import full_precision

__all__ = [
    "InferenceSettings",
    "check_score_thresholds",
    "chunked_topk",
    "fast_detections",
    "first_kept_by_nms",
]


@dataclass(frozen=True)
class InferenceSettings:
    """§4.1 "Inference" with detectron2's keys: scores thresholded at ``score_thresh`` (0.05;
    a float, or one threshold per class), at most ``topk_candidates`` (1000) per level,
    class-wise NMS at ``nms_thresh`` (0.5), ``max_detections`` (100) kept."""

    score_thresh: Union[float, Tuple[float, ...]]
    topk_candidates: int
    nms_thresh: float
    max_detections: int
    class_agnostic_nms: bool


def chunked_topk(values: Tensor, k: int, chunks: int = 16) -> Tuple[Tensor, Tensor]:
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


def first_kept_by_nms(boxes: Tensor, scores: Tensor, classes: Tensor, settings: InferenceSettings) -> Tensor:
    """Indices of the ``max_detections`` best boxes that survive NMS (class-wise, or over all
    classes), best first; the same as NMS over all candidates, truncated.

    Greedy NMS decides a box from the better boxes only, so NMS over the C best candidates
    keeps the same first boxes as NMS over all of them; C starts at 4x the detections wanted
    and doubles until enough survive or every candidate is in. Greedy order is score
    descending, ties in input order (a stable sort), and survivors are returned in that
    order, so exact ties are decided the same way at every C (torchvision's NMS is stable,
    but its per-class path for many boxes re-sorts its output unstably).

    Args:
        boxes (Tensor): (M, 4); scores (Tensor): (M,); classes (Tensor): (M,).
    """
    order = scores.argsort(descending=True, stable=True)
    num_candidates = min(len(order), 4 * settings.max_detections)
    while True:
        top = order[:num_candidates]
        if settings.class_agnostic_nms:
            keep = nms(boxes[top], scores[top], settings.nms_thresh)
        else:
            keep = batched_nms(boxes[top], scores[top], classes[top], settings.nms_thresh)
        if len(keep) >= settings.max_detections or num_candidates == len(order):
            return top[keep.sort().values[: settings.max_detections]]  # positions in greedy order
        num_candidates = min(len(order), 2 * num_candidates)


def _candidates_of_level(
    anchors: Tensor, logits: Tensor, deltas: Tensor, logit_thresh: Tensor, topk: int, box2box_transform: Box2BoxTransform
) -> Tuple[Tensor, Tensor, Tensor]:
    """Threshold, keep the top-k (anchor, class) pairs of one level, decode their boxes.

    Args:
        anchors (Tensor): (HWA, 4); logits (Tensor): (HWA, K); deltas (Tensor): (HWA, 4);
        logit_thresh (Tensor): () or (K,), σ^-1 of the score threshold(s).

    Returns:
        boxes (M, 4), logits (M,), classes (M,) with M ≤ ``topk``.
    """
    num_classes = logits.shape[1]
    passing = logits > logit_thresh  # (HWA, K)
    if int(passing.sum()) > topk:  # top-k of the passing scores, no index list
        scores, flat = chunked_topk(torch.where(passing, logits, -math.inf).flatten(), topk)
        anchor_idxs, classes = flat // num_classes, flat % num_classes
    else:  # thresholding first: few candidates, no top-k needed (NMS sorts)
        anchor_idxs, classes = torch.nonzero(passing, as_tuple=True)
        scores = logits[anchor_idxs, classes]
    boxes = box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs])
    return boxes, scores, classes


def fast_detections(
    anchors: Sequence[Boxes],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    image_size: Tuple[int, int],
    settings: InferenceSettings,
    box2box_transform: Box2BoxTransform,
) -> Instances:
    """§4.1's inference for one image, faster than decoding scores (``FAST_POSTPROCESS``).

    Scores are thresholded and ranked as logits (σ is monotonic), so the sigmoid is only
    computed for the detections returned; when more than ``topk_candidates`` pass on a level
    the top-k runs as :func:`chunked_topk`; NMS runs over the best candidates only
    (:func:`first_kept_by_nms`). Same detections as the plain path up to float rounding
    (ties of float32 scores may be ordered differently).

    Args:
        anchors (list[Boxes]): per level (HiWiA, 4); logits, deltas (list[Tensor]): per level
            (HiWiA, K) and (HiWiA, 4) of this image.
        image_size: (h, w) before padding.
    """
    with full_precision(logits[0].device.type):
        logit_thresh = torch.logit(torch.as_tensor(settings.score_thresh, dtype=logits[0].dtype, device=logits[0].device))
        candidates = [
            _candidates_of_level(a.tensor, lg, dl, logit_thresh, settings.topk_candidates, box2box_transform)
            for a, lg, dl in zip(anchors, logits, deltas)
        ]
        boxes, scores, classes = (cat(parts) for parts in zip(*candidates))
        keep = first_kept_by_nms(boxes, scores, classes, settings)
        return Instances(image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep].sigmoid(), pred_classes=classes[keep])


def check_score_thresholds(thresh: Union[float, Sequence[float]], num_classes: int) -> Union[float, Tuple[float, ...]]:
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
