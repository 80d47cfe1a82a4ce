"""Anchor matching (§4): the IoU rule, with an opt-in fix so that no ground-truth box is lost.

§4 ("Anchors"): an anchor is foreground for the box it overlaps most if that IoU is ≥ 0.5,
background below 0.4 and ignored in between. Detectron (the paper's code) and detectron2
also keep, for each box, its highest-IoU anchors as foreground ("low-quality matches",
the RPN rule of Faster R-CNN §3.1.2), so that small or oddly shaped boxes are trained on.

That rule does not give every box an anchor. A low-quality anchor is labelled foreground
but keeps its argmax-IoU box, which may be another one; a box whose best anchors all
overlap a neighbour more gets none and is never trained on. For example, with two
identical boxes every anchor goes to the first (the argmax takes the first of a tie), and
a 10 px box centred in a 100 px box loses its best anchor, a 32 px square (IoU 100/1024),
to the big box (IoU 1024/10000). :class:`EveryGTMatcher` repairs this after detectron2's
matching; :func:`build_anchor_matcher` picks one of the two rules.

:func:`assign_anchors` applies the rule to a batch and returns an :class:`AnchorAssignment`:
the anchor labels the losses train on, and per box what the diagnostics log.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_ioa, pairwise_iou
from torch import Tensor

__all__ = [
    "AnchorAssignment",
    "EveryGTMatcher",
    "anchor_matcher_from_config",
    "assign_anchors",
    "build_anchor_matcher",
    "foreground_counts",
    "foreground_iou_threshold",
]


@dataclass(frozen=True)
class AnchorAssignment:
    """What the §4 IoU rule made of a batch of N images with R anchors and B boxes in all.

    Attributes:
        labels (Tensor): (N, R) int64: a class in [0, K) for foreground anchors, K for
            background, -1 for ignored anchors (IoU in [0.4, 0.5), §4).
        matched_boxes (Tensor): (N, R, 4) XYXY, the box each anchor is matched to
            (meaningful where foreground).
        matched_idxs (Tensor): (N, R) int64, that box's index among its image's boxes
            (meaningful where foreground; -1 in an image without boxes).
        gt_best_iou (Tensor): (B,) each box's best IoU with any anchor, images in order.
        gt_num_foreground (Tensor): (B,) int64, each box's number of foreground anchors.
        num_classes (int): K.
    """

    labels: Tensor
    matched_boxes: Tensor
    matched_idxs: Tensor
    gt_best_iou: Tensor
    gt_num_foreground: Tensor
    num_classes: int

    @property
    def foreground(self) -> Tensor:
        """(N, R) bool: anchors labelled with a class."""
        return (self.labels >= 0) & (self.labels != self.num_classes)

    def anchors_in(self, start: int, end: int) -> "AnchorAssignment":
        """The assignment of the anchors ``start:end`` (e.g. one FPN level); per-box fields unchanged."""
        return AnchorAssignment(
            self.labels[:, start:end],
            self.matched_boxes[:, start:end],
            self.matched_idxs[:, start:end],
            self.gt_best_iou,
            self.gt_num_foreground,
            self.num_classes,
        )


def _split_crowd_regions(instances: Instances) -> Tuple[Instances, Tensor]:
    """(the boxes to match, the (C, 4) crowd regions) of one image (``gt_ignore`` rows,
    retina_focal/data/mapper.py)."""
    if not instances.has("gt_ignore"):
        return instances, instances.gt_boxes.tensor[:0]
    ignore = instances.gt_ignore
    boxes = instances[~ignore]
    return Instances(boxes.image_size, gt_boxes=boxes.gt_boxes, gt_classes=boxes.gt_classes), instances.gt_boxes.tensor[ignore]


def _ignore_in_crowd_(labels: Tensor, anchors: Boxes, regions: Tensor, ioa_thresh: float, num_classes: int) -> None:
    """In place: background anchors covered by a crowd region by more than ``ioa_thresh``
    of their area become ignored (-1); foreground anchors stay."""
    if len(regions) == 0:
        return
    covered = pairwise_ioa(Boxes(regions), anchors).max(dim=0).values > ioa_thresh  # (R,)
    labels[covered & (labels == num_classes)] = -1


@torch.no_grad()
def assign_anchors(
    anchors: Boxes, gt_instances: List[Instances], matcher: Matcher, num_classes: int, crowd_ioa: float = 0.0
) -> AnchorAssignment:
    """Label every anchor of every image with a class, background or "ignore" (§4).

    Args:
        anchors (Boxes): (R, 4), all levels concatenated, shared by the images.
        gt_instances (list[Instances]): per image, ``gt_boxes`` (XYXY) and ``gt_classes``,
            and crowd regions as ``gt_ignore`` rows if any (not matched).
        matcher (Matcher): the IoU rule (:func:`build_anchor_matcher`).
        num_classes (int): K, the label of background anchors.
        crowd_ioa (float): > 0: background anchors whose intersection with a crowd region
            exceeds this share of their area are ignored (``CROWD_IGNORE_IOA``).

    Returns:
        AnchorAssignment; its per-box fields cover the matched boxes, not the regions.
    """
    labels, boxes, idxs, best_iou, num_fg = [], [], [], [], []
    for instances in gt_instances:  # images differ in their number of boxes
        instances, regions = _split_crowd_regions(instances)
        iou = pairwise_iou(instances.gt_boxes, anchors)  # (G, R)
        matched_idxs, anchor_labels = matcher(iou)  # (R,), (R,) in {-1, 0, 1}
        best_iou.append(iou.max(dim=1).values if iou.numel() else iou.new_zeros(len(instances)))  # (G,)
        num_fg.append(foreground_counts(matched_idxs, anchor_labels, len(instances)))  # (G,)
        if len(instances) > 0:
            image_labels = instances.gt_classes[matched_idxs]
            image_labels = torch.where(anchor_labels == 0, torch.full_like(image_labels, num_classes), image_labels)
            image_labels = torch.where(anchor_labels == -1, torch.full_like(image_labels, -1), image_labels)
            boxes.append(instances.gt_boxes.tensor[matched_idxs])
            idxs.append(matched_idxs)
        else:  # no objects: every anchor is background, whatever IOU_LABELS says
            image_labels = torch.full_like(matched_idxs, num_classes)
            boxes.append(torch.zeros_like(anchors.tensor))
            idxs.append(torch.full_like(matched_idxs, -1))
        if crowd_ioa > 0:
            _ignore_in_crowd_(image_labels, anchors, regions, crowd_ioa, num_classes)
        labels.append(image_labels)
    return AnchorAssignment(
        torch.stack(labels), torch.stack(boxes), torch.stack(idxs), torch.cat(best_iou), torch.cat(num_fg), num_classes
    )


def foreground_counts(matches: Tensor, match_labels: Tensor, num_gt: int) -> Tensor:
    """Number of foreground anchors matched to each ground-truth box.

    Args:
        matches (Tensor): (R,) int64, matched box index in [0, G) of every anchor.
        match_labels (Tensor): (R,) in {-1, 0, 1}; 1 = foreground.
        num_gt (int): G.

    Returns:
        Tensor: (G,) int64 counts.
    """
    return torch.bincount(matches[match_labels == 1], minlength=num_gt)  # (G,)


class EveryGTMatcher(Matcher):
    """detectron2's :class:`Matcher` plus a repair step: every box with IoU > 0 to some
    anchor gets at least one foreground anchor (an opt-in deviation from Detectron).

    After detectron2's matching, each box g that overlaps some anchor (IoU > 0) but has no
    foreground anchor takes its highest-IoU anchor among the anchors that are not the only
    foreground anchor of another box: that anchor is matched to g and labelled 1. An anchor
    taken from a box that has other foreground anchors leaves that box at least one.

    Example: two identical boxes A, B. detectron2 gives all anchors to A (B gets none);
    here B takes its best anchor if A has several foreground anchors (A keeps the rest),
    or its second best anchor if A has only one.

    Guarantee: a box gets a foreground anchor if one of its positive-IoU anchors is not the
    only foreground anchor of another box; at most G - 1 anchors are, so any box with ≥ G
    positive-IoU anchors (every box on a dense anchor grid) is covered. Where no box loses
    out, the output equals detectron2's exactly. Only the (rare) boxes without foreground
    anchors are looped over; the rest is vectorized.
    """

    def __init__(self, thresholds: List[float], labels: List[int], allow_low_quality_matches: bool = True):
        """Same arguments as detectron2's :class:`Matcher`; low-quality matches are on by
        default, as in detectron2's RetinaNet."""
        super().__init__(thresholds, labels, allow_low_quality_matches=allow_low_quality_matches)

    def __call__(self, match_quality_matrix: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            match_quality_matrix (Tensor): (G, R) IoU of G boxes with R anchors, all ≥ 0.

        Returns:
            matches (Tensor): (R,) int64, matched box index in [0, G) (0 when G = 0).
            match_labels (Tensor): (R,) int8 in {-1 (ignore), 0 (background), 1 (foreground)}.
        """
        matches, match_labels = super().__call__(match_quality_matrix)  # (R,), (R,)
        if match_quality_matrix.numel() == 0:  # no boxes (or no anchors): detectron2's answer
            return matches, match_labels
        self._give_every_gt_an_anchor_(match_quality_matrix, matches, match_labels)
        return matches, match_labels

    @staticmethod
    def _give_every_gt_an_anchor_(iou: Tensor, matches: Tensor, match_labels: Tensor) -> None:
        """In place: match each overlapping box without foreground anchors to its best free anchor.

        Args:
            iou (Tensor): (G, R).
            matches (Tensor): (R,) int64, modified in place.
            match_labels (Tensor): (R,) int8, modified in place.
        """
        counts = foreground_counts(matches, match_labels, iou.shape[0])  # (G,)
        lost = (counts == 0) & (iou.max(dim=1).values > 0)  # (G,)
        for g in torch.nonzero(lost).flatten().tolist():  # rare: usually no iteration
            # the only foreground anchor of another box must stay with it
            sole = (match_labels == 1) & (counts[matches] == 1)  # (R,)
            candidate_iou = iou[g].masked_fill(sole, 0.0)  # (R,)
            best = int(candidate_iou.argmax())
            if candidate_iou[best] <= 0:  # every overlapping anchor is another box's only one
                continue
            if match_labels[best] == 1:
                counts[matches[best]] -= 1
            matches[best] = g
            match_labels[best] = 1
            counts[g] = 1


def _check_thresholds_and_labels(thresholds: Sequence[float], labels: Sequence[int]) -> None:
    """Raise a ValueError naming the cfg key (detectron2's Matcher only asserts)."""
    thresholds, labels = list(thresholds), list(labels)
    if (
        not thresholds
        or not all(0.0 < t <= 1.0 for t in thresholds)
        or any(low > high for low, high in zip(thresholds[:-1], thresholds[1:]))
    ):
        raise ValueError(
            "MODEL.RETINANET.IOU_THRESHOLDS must be a non-empty list of IoUs in (0, 1] in "
            f"non-decreasing order, e.g. [0.4, 0.5] (§4), got {thresholds}"
        )
    if len(labels) != len(thresholds) + 1 or not all(l in (-1, 0, 1) for l in labels):
        raise ValueError(
            f"MODEL.RETINANET.IOU_LABELS must give one label in {{-1, 0, 1}} to each of the "
            f"{len(thresholds) + 1} IoU ranges of MODEL.RETINANET.IOU_THRESHOLDS = {thresholds}, "
            f"e.g. [0, -1, 1] (§4), got {labels}"
        )


def build_anchor_matcher(thresholds: Sequence[float], labels: Sequence[int], every_gt: bool) -> Matcher:
    """The §4 anchor matcher: detectron2's rule, or :class:`EveryGTMatcher` if ``every_gt``.

    Args:
        thresholds (list[float]): ``MODEL.RETINANET.IOU_THRESHOLDS``, e.g. [0.4, 0.5] (§4).
        labels (list[int]): ``MODEL.RETINANET.IOU_LABELS``, e.g. [0, -1, 1]: background
            below 0.4, ignored in [0.4, 0.5), foreground from 0.5.
        every_gt (bool): repair detectron2's matching so no box is left without an anchor.

    Returns:
        Matcher: with low-quality matches on, as in Detectron and detectron2's RetinaNet.
    """
    _check_thresholds_and_labels(thresholds, labels)
    matcher_cls = EveryGTMatcher if every_gt else Matcher
    return matcher_cls(list(thresholds), list(labels), allow_low_quality_matches=True)


def anchor_matcher_from_config(cfg) -> Matcher:
    """:func:`build_anchor_matcher` with the config's keys: ``MODEL.RETINANET.IOU_THRESHOLDS``,
    ``IOU_LABELS`` and ``MODEL.RETINA_FOCAL.MATCH_EVERY_GT`` (the model's and the coverage
    diagnostics' matcher)."""
    return build_anchor_matcher(
        cfg.MODEL.RETINANET.IOU_THRESHOLDS, cfg.MODEL.RETINANET.IOU_LABELS, every_gt=cfg.MODEL.RETINA_FOCAL.MATCH_EVERY_GT
    )


def foreground_iou_threshold(matcher: Matcher) -> float:
    """The lowest IoU the matcher labels foreground (0.5 for §4's [0.4, 0.5], [0, -1, 1])."""
    lows = matcher.thresholds[:-1]  # detectron2 brackets the thresholds with -inf and +inf
    return min(low for low, label in zip(lows, matcher.labels) if label == 1)
