"""Crowd and "don't care" regions as ignore regions for the anchors (``CROWD_IGNORE_IOA``).

detectron2's ``DatasetMapper`` drops every ``iscrowd`` annotation before the model sees it,
so the anchors on a crowd of people are trained as background although COCOEvaluator
ignores detections there. With ``MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA`` > 0,
:class:`CrowdRegionsMapper` keeps them, transformed like the boxes, as extra ground-truth
rows marked ``gt_ignore`` (class -1); the model's labelling (``matching.assign_anchors``)
matches anchors to the real boxes only and ignores (-1) the background anchors that a crowd
region covers by more than the threshold (intersection over the anchor's area). Off (0),
the default, is the paper's behaviour: crowd boxes are dropped, their anchors are background.

Crowd regions are COCO's ``iscrowd: 1`` boxes, VOC ``difficult`` objects with
``DATASETS.VOC_DIFFICULT_AS_CROWD`` and the CSV rows of ``DATASETS.CSV_IGNORE_CLASS``.
"""
from typing import Dict, List, Sequence

import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import Boxes, Instances

from retina_focal.data.augmentation import build_train_augmentation, detectron2_view

__all__ = ["CrowdRegionsMapper", "build_train_mapper", "with_crowd_regions"]


def with_crowd_regions(instances: Instances, regions: Sequence[Sequence[float]]) -> Instances:
    """``instances`` followed by one row per XYXY region, with ``gt_ignore`` True on those
    (class -1) and False on the boxes; ``instances`` itself when there is no region."""
    if not regions:
        return instances
    boxes = Boxes(torch.as_tensor(regions, dtype=torch.float32).reshape(-1, 4))
    marked = Instances(instances.image_size, gt_boxes=instances.gt_boxes, gt_classes=instances.gt_classes)
    marked.gt_ignore = torch.zeros(len(instances), dtype=torch.bool)
    crowd = Instances(
        instances.image_size,
        gt_boxes=boxes,
        gt_classes=torch.full((len(boxes),), -1, dtype=torch.int64),
        gt_ignore=torch.ones(len(boxes), dtype=torch.bool),
    )
    return Instances.cat([marked, crowd])


class CrowdRegionsMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` that also passes the crowd annotations on, as
    ``gt_ignore`` rows of ``instances`` (:func:`with_crowd_regions`)."""

    def _transform_annotations(self, dataset_dict: Dict, transforms, image_shape) -> None:
        crowd = [dict(a) for a in dataset_dict["annotations"] if a.get("iscrowd", 0)]
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        regions: List = [utils.transform_instance_annotations(a, transforms, image_shape)["bbox"] for a in crowd]
        dataset_dict["instances"] = with_crowd_regions(dataset_dict["instances"], [list(r) for r in regions])


def build_train_mapper(cfg, **kwargs) -> DatasetMapper:
    """The training mapper of ``cfg``: :class:`CrowdRegionsMapper` when
    ``MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA`` > 0, else detectron2's, with the augmentations of
    ``data.augmentation.build_train_augmentation``. ``kwargs`` as for
    ``DatasetMapper(cfg, is_train=True, ...)`` (e.g. other augmentations)."""
    mapper_cls = CrowdRegionsMapper if cfg.MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA > 0 else DatasetMapper
    args = mapper_cls.from_config(detectron2_view(cfg), is_train=True)
    args.update(kwargs)
    if "augmentations" not in kwargs:
        args["augmentations"] = build_train_augmentation(cfg)
    return mapper_cls(**args)
