"""Checks of training data, run once before training so a bad annotation fails fast.

detectron2's ``DatasetMapper`` silently drops boxes it cannot use: NaN or infinite
coordinates and boxes with x2 < x1 fail its non-empty test and vanish without a word,
and a class id ≥ NUM_CLASSES only fails deep inside the loss (or, on a GPU, as a device
assert) hours later. Here they are errors that name the image, the annotation and the
value. Boxes of zero width or height are dropped by the mapper, as usual; their number is
logged.
"""
import logging
import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode, Instances

__all__ = ["check_dataset_dicts", "check_gt_instances", "check_num_classes"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


def check_num_classes(num_classes: int, dataset_names: Sequence[str]) -> None:
    """Raise if a dataset's ``thing_classes`` metadata disagrees with NUM_CLASSES."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.RETINANET.NUM_CLASSES={num_classes} but dataset {name!r} has "
                f"{len(classes)} classes (metadata thing_classes); set MODEL.RETINANET.NUM_CLASSES {len(classes)}"
            )


def _xyxy(ann: Dict) -> List[float]:
    return BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)


def _annotation_problem(ann: Dict, num_classes: int) -> Optional[str]:
    """What is wrong with one (non-crowd) annotation, or None."""
    category = ann.get("category_id")
    if not isinstance(category, numbers.Integral) or not 0 <= category < num_classes:
        return f"category_id {category!r} is not in [0, {num_classes})"
    bbox = ann.get("bbox")
    if bbox is None or len(bbox) != 4:
        return f"bbox {bbox!r} does not have 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)} is not finite"
    x1, y1, x2, y2 = _xyxy(ann)
    if x2 < x1 or y2 < y1:
        return f"bbox {list(bbox)} ({BoxMode(ann.get('bbox_mode', 0)).name}) has x2 < x1 or y2 < y1"
    return None


def _is_zero_area(ann: Dict) -> bool:
    x1, y1, x2, y2 = _xyxy(ann)
    return x2 == x1 or y2 == y1


def _image_name(record: Dict) -> str:
    return f"image_id={record.get('image_id')!r} ({record.get('file_name', 'no file_name')})"


def check_dataset_dicts(dicts: List[Dict], num_classes: int, dataset_names: Sequence[str] = ()) -> None:
    """Raise a ValueError listing invalid annotations; log how many boxes have zero area.

    Args:
        dicts (list[dict]): detectron2 dataset dicts; crowd annotations are skipped (the
            mapper ignores them for training).
        num_classes (int): K, valid class ids are 0..K-1.
        dataset_names (list[str]): only for the messages.
    """
    problems: List[str] = []
    zero_area = 0
    for record in dicts:
        for i, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            problem = _annotation_problem(ann, num_classes)
            if problem is not None:
                problems.append(f"{_image_name(record)} annotation {i}: {problem}")
            elif _is_zero_area(ann):
                zero_area += 1
    where = f"dataset(s) {list(dataset_names)}" if dataset_names else "the training data"
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{len(problems)} invalid annotation(s) in {where}:\n  {listed}{more}")
    if zero_area:
        logger.warning(f"{zero_area} box(es) of zero width or height in {where} will be dropped")


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
    bad = (classes < 0) | (classes >= num_classes) | ~torch.isfinite(boxes).all(dim=1)
    bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if not bad.any():
        return
    first = int(bad.nonzero()[0])
    for image, instances in enumerate(gt_instances):
        if first < len(instances):
            break
        first -= len(instances)
    raise ValueError(
        f"Ground truth of {_image_name(batched_inputs[image])}, instance {first}: class "
        f"{int(instances.gt_classes[first])} (valid: 0..{num_classes - 1}), box "
        f"{instances.gt_boxes.tensor[first].tolist()} (must be finite with x1 <= x2, y1 <= y2)"
    )
