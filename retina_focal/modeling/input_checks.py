"""Checks of a training batch, run by the model before its forward pass.

detectron2's loss code fails far from the cause on a class id ≥ NUM_CLASSES (deep in the
loss, or as a device assert on a GPU) and on NaN or inverted boxes; here they are errors that
name the image, the instance and the value. Boxes of zero area are dropped as detectron2's
``DatasetMapper`` drops them. The same checks on a whole dataset, once before training, are
``retina_focal.data.checks``.
"""
import logging
from typing import Dict, List

import torch
from detectron2.structures import Instances
from detectron2.utils.logger import log_first_n

__all__ = ["check_gt_instances", "check_training_inputs", "drop_empty_boxes", "image_name"]


def image_name(record: Dict) -> str:
    """How a dataset record or model input is named in errors: its image id and file name."""
    return f"image_id={record.get('image_id')!r} ({record.get('file_name', 'no file_name')})"



def check_training_inputs(batched_inputs: List[Dict], num_classes: int) -> None:
    """Raise if a training batch has no "instances" or invalid ground truth
    (:func:`check_gt_instances`); the model calls this before its forward pass."""
    if any("instances" not in x for x in batched_inputs):
        raise ValueError("RetinaFocal is in training mode but the inputs have no 'instances'")
    check_gt_instances([x["instances"] for x in batched_inputs], num_classes, batched_inputs)


def drop_empty_boxes(gt_instances: List[Instances]) -> List[Instances]:
    """Remove boxes of zero width or height, as detectron2's DatasetMapper does (a box that
    overlaps no anchor would make the matcher's low-quality rule mark every anchor foreground).
    One device synchronization per batch."""
    keeps = [x.gt_boxes.nonempty() for x in gt_instances]
    num_dropped = int(sum((~keep).sum() for keep in keeps))
    if num_dropped == 0:
        return gt_instances
    log_first_n(logging.WARNING, f"Dropped {num_dropped} ground-truth box(es) of zero area", n=5)
    return [x[keep] for x, keep in zip(gt_instances, keeps)]


def check_gt_instances(gt_instances: List[Instances], num_classes: int, batched_inputs: List[Dict]) -> None:
    """The same checks on a training batch, for data that bypass :func:`check_dataset_dicts`
    (custom loaders or mappers). One device synchronization per batch.

    Args:
        gt_instances (list[Instances]): per image, ``gt_boxes`` (XYXY) and ``gt_classes``.
        num_classes (int): K.
        batched_inputs (list[dict]): the model inputs, for the image names.
    """
    classes = torch.cat([x.gt_classes for x in gt_instances])  # (G,) over the batch
    boxes = torch.cat([x.gt_boxes.tensor for x in gt_instances])  # (G, 4)
    regions = torch.cat([x.gt_ignore if x.has("gt_ignore") else torch.zeros(len(x), dtype=torch.bool) for x in gt_instances])
    bad = (~regions & ((classes < 0) | (classes >= num_classes))) | ~torch.isfinite(boxes).all(dim=1)
    bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if not bad.any():
        return
    first = int(bad.nonzero()[0])
    for image, instances in enumerate(gt_instances):
        if first < len(instances):
            break
        first -= len(instances)
    raise ValueError(
        f"Ground truth of {image_name(batched_inputs[image])}, instance {first}: class "
        f"{int(instances.gt_classes[first])} (valid: 0..{num_classes - 1}), box "
        f"{instances.gt_boxes.tensor[first].tolist()} (must be finite with x1 <= x2, y1 <= y2)"
    )
