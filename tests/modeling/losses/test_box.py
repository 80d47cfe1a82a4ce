"""retina_focal/modeling/losses/box.py: the box losses equal detectron2's; the box coding they use
(R-CNN deltas) round-trips and clamps (hypothesis)."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes

from retina_focal.modeling.losses import box_regression_loss

@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "diou", "ciou"])
def test_box_loss_equals_detectron2(loss_type):
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    xy = torch.rand(50, 2) * 100
    anchors = torch.cat([xy, xy + 10 + torch.rand(50, 2) * 40], dim=1)  # (R, 4)
    gt = anchors.unsqueeze(0).repeat(2, 1, 1) + torch.randn(2, 50, 4) * 3  # (N, R, 4)
    deltas = torch.randn(2, 50, 4) * 0.1
    fg = torch.rand(2, 50) < 0.3
    ours = box_regression_loss(anchors, deltas, gt, fg, transform, loss_type, smooth_l1_beta=0.1)
    theirs = _dense_box_regression_loss(
        [Boxes(anchors[:20]), Boxes(anchors[20:])], transform, [deltas[:, :20], deltas[:, 20:]],
        list(gt), fg, box_reg_loss_type=loss_type, smooth_l1_beta=0.1,
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# ------------------------------------------------------ box coding (R-CNN, §4 "Box regression")

BOX2BOX = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))  # default scale_clamp
MAX_SCALE = 1000.0 / 16  # scale_clamp = log(1000 / 16): a 16 px box grows to 1000 px at most


def _xyxy(cx, cy, w, h):
    """(N, 4) XYXY boxes from (N,) centres and sizes."""
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)


@st.composite
def anchors_and_boxes(draw, max_n=16):
    """(N, 4) anchors, sides 8..1000 px and aspect 1:4..4:1, and (N, 4) boxes near them
    whose size ratio to the anchor stays inside the clamp (1/50..50)."""
    n = draw(st.integers(1, max_n))

    def cols(lo, hi):
        """(n,) floats drawn in [lo, hi]."""
        return torch.tensor(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)))

    w = cols(8.0, 1000.0)
    anchors = _xyxy(cols(0.0, 1000.0), cols(0.0, 1000.0), w, w * cols(0.25, 4.0))
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    boxes = _xyxy(
        (anchors[:, 0] + anchors[:, 2]) / 2 + aw * cols(-3.0, 3.0),
        (anchors[:, 1] + anchors[:, 3]) / 2 + ah * cols(-3.0, 3.0),
        aw * cols(0.02, 50.0),
        ah * cols(0.02, 50.0),
    )
    return anchors, boxes


@SETTINGS
@given(anchors_and_boxes())
def test_box_coding_round_trip(anchors_boxes):
    anchors, boxes = anchors_boxes
    decoded = BOX2BOX.apply_deltas(BOX2BOX.get_deltas(anchors, boxes), anchors)
    torch.testing.assert_close(decoded, boxes, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(anchors_and_boxes(), st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4))
@example((torch.tensor([[0.0, 0.0, 16.0, 16.0]]), None), [1e4, -1e4, 1e4, 1e4])
def test_extreme_deltas_give_finite_boxes_within_the_clamp(anchors_boxes, delta):
    anchors = anchors_boxes[0]  # (N, 4)
    deltas = torch.tensor(delta).expand(len(anchors), 4)  # (N, 4) dx, dy, dw, dh
    boxes = BOX2BOX.apply_deltas(deltas, anchors)  # (N, 4)
    assert torch.isfinite(boxes).all()
    sizes = boxes[:, 2:] - boxes[:, :2]  # (N, 2) w, h
    bound = (anchors[:, 2:] - anchors[:, :2]) * MAX_SCALE  # (N, 2)
    # float32 rounding of x1, x2 far from the origin (large dx): a few ulps of |x|
    slack = 1e-5 * bound + 1e-6 * boxes.abs().view(-1, 2, 2).amax(dim=1)  # (N, 2)
    assert (sizes >= 0).all() and (sizes <= bound + slack).all(), (sizes, bound)
    clamped = deltas[:, 2:] >= math.log(MAX_SCALE)  # (N, 2): there the bound is reached
    assert ((sizes - bound).abs() <= slack)[clamped].all(), (sizes, bound)
