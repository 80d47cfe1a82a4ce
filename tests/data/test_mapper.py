"""retina_focal/data/mapper.py and the crowd-region rule of matching.assign_anchors
(MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA): crowd boxes become ignored anchors, not background."""
import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_ioa
from detectron2.utils.events import EventStorage

from retina_focal.data.mapper import CrowdRegionsMapper, build_train_mapper, with_crowd_regions
from retina_focal.modeling.matching import assign_anchors, build_anchor_matcher
from tests.conftest import make_instances, small_cfg

CROWD = [60.0, 10.0, 120.0, 70.0]  # a crowd region, XYXY
BOX = [10.0, 10.0, 50.0, 50.0]  # a real box, class 1


def _anchor_grid(step=8, sizes=(16, 32)):
    xy = torch.stack(torch.meshgrid(torch.arange(0, 128, step), torch.arange(0, 128, step), indexing="xy"), -1).reshape(-1, 2)
    return Boxes(torch.cat([torch.cat([xy - s / 2, xy + s / 2], 1) for s in sizes]).float())


def test_background_anchors_in_a_crowd_region_become_ignored_and_nothing_else_changes():
    anchors, matcher = _anchor_grid(), build_anchor_matcher([0.4, 0.5], [0, -1, 1], every_gt=False)
    plain = make_instances([BOX], [1])
    with_crowd = with_crowd_regions(plain, [CROWD])
    off = assign_anchors(anchors, [with_crowd], matcher, num_classes=3, crowd_ioa=0.0)
    on = assign_anchors(anchors, [with_crowd], matcher, num_classes=3, crowd_ioa=0.5)
    reference = assign_anchors(anchors, [plain], matcher, num_classes=3)
    assert torch.equal(off.labels, reference.labels)  # off: the region plays no part (the paper)
    covered = pairwise_ioa(Boxes(torch.tensor([CROWD])), anchors)[0] > 0.5  # (R,)
    changed = on.labels[0] != reference.labels[0]
    assert changed.any() and torch.equal(changed, covered & (reference.labels[0] == 3))
    assert (on.labels[0][changed] == -1).all()
    assert torch.equal(on.gt_best_iou, reference.gt_best_iou) and torch.equal(on.gt_num_foreground, reference.gt_num_foreground)
    print(f"crowd region: {int(covered.sum())} anchors covered > 0.5, {int(changed.sum())} background -> ignored")


def test_a_foreground_anchor_inside_a_crowd_region_stays_foreground():
    anchors, matcher = _anchor_grid(), build_anchor_matcher([0.4, 0.5], [0, -1, 1], every_gt=False)
    inside = [70.0, 20.0, 100.0, 50.0]  # a real box inside the crowd region
    instances = with_crowd_regions(make_instances([inside], [2]), [CROWD])
    on = assign_anchors(anchors, [instances], matcher, num_classes=3, crowd_ioa=0.5)
    reference = assign_anchors(anchors, [make_instances([inside], [2])], matcher, num_classes=3)
    assert torch.equal(on.foreground, reference.foreground) and on.foreground.any()


def _dataset_dict(tmp_path):
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    anns = [{"bbox": BOX, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 0},
            {"bbox": CROWD, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1}]
    return {"file_name": path, "image_id": 0, "height": 128, "width": 128, "annotations": anns}


OPTS = ["INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.RANDOM_FLIP", "none", "MODEL.PIXEL_STD", [57.375, 57.12, 58.395]]


def test_the_mapper_keeps_crowd_boxes_as_ignore_rows_only_when_asked(tmp_path):
    record = _dataset_dict(tmp_path)
    assert type(build_train_mapper(small_cfg(*OPTS))) is DatasetMapper
    mapper = build_train_mapper(small_cfg(*OPTS, "MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA", 0.5))
    assert isinstance(mapper, CrowdRegionsMapper)
    instances = mapper(record)["instances"]
    assert instances.gt_ignore.tolist() == [False, True] and instances.gt_classes.tolist() == [1, -1]
    torch.testing.assert_close(instances.gt_boxes.tensor, torch.tensor([BOX, CROWD]))
    assert len(DatasetMapper(small_cfg(*OPTS), is_train=True)(record)["instances"]) == 1  # detectron2 drops it


@pytest.mark.slow
def test_end_to_end_a_crowd_region_is_no_longer_background_loss(tmp_path):
    """The same image and weights: with CROWD_IGNORE_IOA the anchors on the crowd region are
    ignored, so they no longer add background loss; elsewhere the labels are the same."""
    record = _dataset_dict(tmp_path)
    off_cfg, on_cfg = small_cfg(*OPTS), small_cfg(*OPTS, "MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA", 0.5)
    off, on = build_model(off_cfg), build_model(on_cfg)
    with torch.no_grad():  # p = 0.5 everywhere instead of the prior: background anchors have a real loss
        off.head.cls_score.bias.zero_()
    on.load_state_dict(off.state_dict())
    batch_off, batch_on = [build_train_mapper(off_cfg)(record)], [build_train_mapper(on_cfg)(record)]
    anchors, logits, _, a_off = off.labelled_predictions(batch_off)
    _, _, _, a_on = on.labelled_predictions(batch_on)
    covered = pairwise_ioa(Boxes(torch.tensor([CROWD])), Boxes.cat(anchors))[0] > 0.5
    assert ((a_off.labels[0] == 3) & covered).sum() > 0  # detectron2: background under the crowd
    assert ((a_on.labels[0] == 3) & covered).sum() == 0
    assert torch.equal(a_on.labels[0][~covered], a_off.labels[0][~covered])
    with EventStorage():
        loss_off, loss_on = off(batch_off)["loss_cls"], on(batch_on)["loss_cls"]
    assert loss_on < 0.9 * loss_off
    print(f"crowd end to end: {int(((a_off.labels[0] == 3) & covered).sum())} background anchors -> ignored; "
          f"loss_cls {loss_off.item():.4f} -> {loss_on.item():.4f}")


def test_crowd_ignore_ioa_outside_0_1_is_named():
    with pytest.raises(ValueError, match=r"CROWD_IGNORE_IOA must be in \[0, 1\]"):
        build_model(small_cfg("MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA", 1.5))
