"""Assignment metrics logged every training iteration: how the §4 IoU rule treats the batch.

The :class:`~retina_focal.modeling.matching.AnchorAssignment` that RetinaFocal's ``label_anchors``
returns already holds each box's best anchor IoU and number of foreground anchors (from the
matcher's IoU matrix: no second IoU pass); :func:`log_assignment_metrics` writes, to
detectron2's EventStorage (so to ``metrics.json`` and TensorBoard):

* ``assign/fg_anchors_per_image/<level>``: foreground anchors per image on each FPN level;
* ``assign/anchors_per_image``, ``assign/fg_anchors_per_image/all`` and
  ``assign/bg_anchors_per_image``: all, foreground and background anchors per image of the
  batch (ignored anchors are neither). Their ratio over a run, mean background / mean
  foreground, is the imbalance of §3 (the paper's §1: ~1:1000 on COCO). Written without
  smoothing, so each ``metrics.json`` row holds one batch's value and a mean over rows is
  unbiased (a median of a sparse dataset's foreground counts would be near zero);
* ``assign/gt_with_fg_anchor``: share of ground-truth boxes with at least one foreground
  anchor (by the IoU rule or by the low-quality rescue);
* ``assign/gt_best_iou_above_fg``: share of boxes whose best anchor reaches the foreground
  IoU (0.5 in §4), i.e. that are positives without the low-quality rescue;
* ``assign/matched_gt_best_iou``: mean best anchor IoU of the boxes with a foreground anchor.

:func:`warn_if_anchors_miss_boxes` warns once when too many boxes of a batch stay below the
foreground IoU (see ``MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION``).
"""
import logging
from typing import List, Sequence

import torch

from retina_focal.modeling.matching import AnchorAssignment

__all__ = ["log_assignment_metrics", "warn_if_anchors_miss_boxes"]

logger = logging.getLogger(__name__)


def log_assignment_metrics(
    storage, assignment: AnchorAssignment, level_sizes: Sequence[int], level_names: Sequence[str], fg_iou: float
) -> List[float]:
    """Write the ``assign/*`` scalars of one batch (module docstring) with one device sync.

    Args:
        storage (EventStorage): detectron2's current storage.
        assignment (AnchorAssignment): the batch's labels (N, R) and per-box statistics (B,).
        level_sizes (list[int]): HiWiA of each level, summing to R; level_names: e.g. p3…p7.
        fg_iou (float): the foreground IoU threshold.

    Returns:
        list[float]: [boxes, boxes with a foreground anchor, boxes with best IoU ≥ fg_iou],
        as counts (for :func:`warn_if_anchors_miss_boxes`).
    """
    fg_mask, best_iou = assignment.foreground, assignment.gt_best_iou
    per_level = torch.stack([m.sum() for m in fg_mask.split(list(level_sizes), dim=1)]).float()  # (L,)
    matched = assignment.gt_num_foreground > 0  # (B,)
    num_bg = (assignment.labels == assignment.num_classes).sum()
    counts = torch.stack([matched.sum(), (best_iou >= fg_iou).sum(), num_bg]).float()  # (3,)
    matched_iou = (best_iou * matched).sum()
    values = torch.cat([per_level / fg_mask.shape[0], counts, matched_iou[None]]).tolist()
    num_boxes = len(best_iou)
    num_matched, num_above, num_bg = values[len(level_names) : len(level_names) + 3]
    num_images, num_anchors = fg_mask.shape
    storage.put_scalars(
        **{f"assign/fg_anchors_per_image/{name}": v for name, v in zip(level_names, values)}
    )
    storage.put_scalars(
        smoothing_hint=False,
        **{
            "assign/anchors_per_image": num_anchors,
            "assign/fg_anchors_per_image/all": sum(values[: len(level_names)]),
            "assign/bg_anchors_per_image": num_bg / num_images,
        },
    )
    if num_boxes:  # images without boxes say nothing about coverage
        storage.put_scalars(
            **{
                "assign/gt_with_fg_anchor": num_matched / num_boxes,
                "assign/gt_best_iou_above_fg": num_above / num_boxes,
            }
        )
    if num_matched:
        storage.put_scalar("assign/matched_gt_best_iou", values[-1] / num_matched)
    return [num_boxes, num_matched, num_above]


def warn_if_anchors_miss_boxes(counts: Sequence[float], fg_iou: float, max_fraction: float, iteration: int) -> bool:
    """Log a warning if more than ``max_fraction`` of a batch's boxes have no anchor with
    IoU ≥ ``fg_iou``; return whether it did.

    Args:
        counts: [boxes, boxes with a foreground anchor, boxes with best IoU ≥ fg_iou], from
            :func:`log_assignment_metrics`.
        fg_iou (float): the foreground IoU threshold; max_fraction (float): in [0, 1].
        iteration (int): for the message.
    """
    num_boxes, num_matched, num_above = (int(c) for c in counts)
    below = num_boxes - num_above
    if num_boxes == 0 or below <= max_fraction * num_boxes:
        return False
    rescued = num_matched - num_above
    logger.warning(
        f"Anchor coverage: in the batch of iteration {iteration}, {below} of {num_boxes} ground-truth "
        f"boxes ({below / num_boxes:.0%}) have no anchor with IoU >= {fg_iou:g}; {rescued} of them are "
        f"foreground only through the low-quality rule (their best anchor), {num_boxes - num_matched} "
        "get no foreground anchor at all. The anchors (MODEL.ANCHOR_GENERATOR.SIZES / ASPECT_RATIOS) "
        "may not fit the objects at this input size: `python tools/anchor_stats.py --config-file "
        "<config>` measures the dataset's coverage and proposes anchors (docs/diagnostics.md). "
        "This warning is shown once; MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION sets its threshold."
    )
    return True
