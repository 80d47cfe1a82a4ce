"""retina_focal/modeling/matching.py: the §4 IoU rule (thresholds, ignore band, low-quality matches),
the assignment value, and EveryGTMatcher's repair (hypothesis, against detectron2's Matcher)."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import given, settings
from hypothesis import strategies as st

from retina_focal.modeling.anchors import RetinaFocalAnchorGenerator
from retina_focal.modeling.matching import EveryGTMatcher, build_anchor_matcher
from tests.conftest import make_instances, small_cfg

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)


def test_matching_thresholds_fg_ignore_bg():
    model = build_model(small_cfg())
    gt = make_instances([[0, 0, 10, 10]], [2])
    anchors = [Boxes(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 22.5], [0, 0, 10, 30], [0, 0, 10, 18]]))]
    # IoUs: 1.0 (fg), 0.444 (ignored band [0.4, 0.5)), 0.333 (bg), 0.555 (fg)
    assignment = model.label_anchors(anchors, [gt])
    assert assignment.labels.tolist() == [[2, -1, 3, 2]]  # K = 3 is background, -1 ignored
    assert assignment.matched_boxes[0, 0].tolist() == [0, 0, 10, 10]
    assert assignment.matched_idxs.tolist() == [[0, 0, 0, 0]]
    assert assignment.gt_best_iou.tolist() == [1.0] and assignment.gt_num_foreground.tolist() == [2]


def test_low_quality_match_keeps_every_box_one_anchor():
    model = build_model(small_cfg())
    gt = make_instances([[0, 0, 10, 10]], [1])
    anchors = [Boxes(torch.tensor([[0, 0, 10, 30.0], [50, 50, 60, 60]]))]  # best IoU only 0.33
    assert model.label_anchors(anchors, [gt]).labels.tolist() == [[1, 3]]


# ------------------------------------------------------------------ anchor matching (§4)

IMAGE = 256
STRIDES = [8, 16, 32, 64, 128]


@pytest.fixture(scope="module")
def anchors() -> Boxes:
    """P3-P7 anchors of a 256×256 image: 32-512 px, ratios 1:2, 1:1, 2:1 (§4), (R, 4)."""
    generator = RetinaFocalAnchorGenerator(
        sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[0.5, 1.0, 2.0], strides=STRIDES
    )
    features = [torch.zeros(1, 1, IMAGE // s, IMAGE // s) for s in STRIDES]
    return Boxes.cat(generator(features))


@st.composite
def gt_boxes(draw):
    """1-8 integer boxes, sides 2-200 px, inside the image; duplicates are likely."""
    boxes = []
    for _ in range(draw(st.integers(1, 8))):
        w, h = draw(st.integers(2, 200)), draw(st.integers(2, 200))
        x, y = draw(st.integers(0, IMAGE - w)), draw(st.integers(0, IMAGE - h))
        boxes.append([x, y, x + w, y + h])
    return Boxes(torch.tensor(boxes, dtype=torch.float32))


def _unmatched_gts(matches, match_labels, num_gt):
    """Indices of the boxes without a foreground anchor: list[int]."""
    covered = set(matches[match_labels == 1].tolist())
    return [g for g in range(num_gt) if g not in covered]


def _match_both(boxes, anchors):
    """(G, R) IoU, detectron2's RetinaNet matching and EveryGTMatcher's, on the §4 rule."""
    iou = pairwise_iou(boxes, anchors)  # (G, R)
    detectron2 = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    return iou, detectron2, EveryGTMatcher([0.4, 0.5], [0, -1, 1])(iou)


@pytest.mark.slow
@settings(SETTINGS, max_examples=100)
@given(boxes=gt_boxes())
def test_every_gt_gets_a_foreground_anchor(boxes, anchors):
    iou, (d2_matches, d2_labels), (matches, labels) = _match_both(boxes, anchors)
    assert (iou.max(dim=1).values > 0).all()  # every box overlaps some anchor
    assert _unmatched_gts(matches, labels, len(boxes)) == []
    lost = _unmatched_gts(d2_matches, d2_labels, len(boxes))
    changed = (matches != d2_matches) | (labels != d2_labels)  # (R,)
    if not lost:  # no conflict: exactly detectron2's output
        assert not changed.any()
    # the repair only adds foreground anchors, each for a box detectron2 lost
    assert (labels[changed] == 1).all()
    assert set(matches[changed].tolist()) <= set(lost)


@pytest.mark.parametrize(
    "boxes",
    [
        [[100, 100, 164, 164], [100, 100, 164, 164]],  # two identical boxes
        [[78, 78, 178, 178], [123, 123, 133, 133]],  # a 10 px box centred in a 100 px box
    ],
    ids=["identical", "nested"],
)
def test_detectron2_loses_a_box_that_every_gt_matcher_keeps(boxes, anchors):
    """Shows the property above can fail: detectron2's rule leaves box 1 without an anchor."""
    boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))  # (2, 4)
    _, (d2_matches, d2_labels), (matches, labels) = _match_both(boxes, anchors)
    assert _unmatched_gts(d2_matches, d2_labels, 2) == [1]
    assert _unmatched_gts(matches, labels, 2) == []


def test_equals_detectron2_without_conflict(anchors):
    boxes = Boxes(torch.tensor([[8, 8, 40, 72], [120, 100, 250, 180], [200, 10, 214, 20]], dtype=torch.float32))
    _, (d2_matches, d2_labels), (matches, labels) = _match_both(boxes, anchors)
    assert _unmatched_gts(d2_matches, d2_labels, 3) == []
    assert torch.equal(matches, d2_matches) and torch.equal(labels, d2_labels)


def test_repair_by_hand():
    """Box 1's best anchor 0 is one of box 0's two: box 1 takes it, box 0 keeps anchor 1."""
    iou = torch.tensor([[0.6, 0.6, 0.0], [0.55, 0.0, 0.3]])  # (G=2, R=3)
    matches, labels = EveryGTMatcher([0.4, 0.5], [0, -1, 1])(iou)
    assert matches.tolist() == [1, 0, 1] and labels.tolist() == [1, 1, 0]


def test_never_takes_the_only_anchor_of_another_box():
    """Box 1 overlaps only anchor 0, box 0's only foreground anchor: it stays unmatched."""
    iou = torch.tensor([[0.3, 0.0], [0.2, 0.0]])  # (G=2, R=2)
    matches, labels = EveryGTMatcher([0.4, 0.5], [0, -1, 1])(iou)
    assert matches.tolist() == [0, 0] and labels.tolist() == [1, 0]


@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (3, 0)])
def test_empty_inputs_as_detectron2(shape):
    iou = torch.zeros(shape)
    expected = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    for got, want in zip(EveryGTMatcher([0.4, 0.5], [0, -1, 1])(iou), expected):
        assert torch.equal(got, want) and got.dtype == want.dtype


# ------------------------------------------------------------------ build_anchor_matcher


@pytest.mark.parametrize("every_gt, cls", [(False, Matcher), (True, EveryGTMatcher)])
def test_build_anchor_matcher_picks_the_rule(every_gt, cls):
    matcher = build_anchor_matcher((0.4, 0.5), (0, -1, 1), every_gt=every_gt)
    assert type(matcher) is cls and matcher.allow_low_quality_matches
    assert matcher.thresholds == [-math.inf, 0.4, 0.5, math.inf] and matcher.labels == [0, -1, 1]


@pytest.mark.parametrize(
    "thresholds, labels, message",
    [
        ([0.5, 0.4], [0, -1, 1], r"IOU_THRESHOLDS .*got \[0\.5, 0\.4\]"),
        ([0.4, 1.5], [0, -1, 1], r"IOU_THRESHOLDS .*got \[0\.4, 1\.5\]"),
        ([0.0, 0.5], [0, -1, 1], r"IOU_THRESHOLDS .*got \[0\.0, 0\.5\]"),
        ([], [0], r"IOU_THRESHOLDS .*got \[\]"),
        ([0.4, 0.5], [0, 1], r"IOU_LABELS .*\[0\.4, 0\.5\].*got \[0, 1\]"),
        ([0.4, 0.5], [0, 2, 1], r"IOU_LABELS .*\[0\.4, 0\.5\].*got \[0, 2, 1\]"),
    ],
)
def test_build_anchor_matcher_names_the_bad_key(thresholds, labels, message):
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\." + message):
        build_anchor_matcher(thresholds, labels, every_gt=True)
