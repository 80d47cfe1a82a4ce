"""Property tests (hypothesis) of the focal loss, the box coding and the anchor matching.

Each property is checked against something independent: torch's BCE, detectron2's
Box2BoxTransform round trip and clamp, detectron2's Matcher, or values derived by hand.
Derandomized, so a run is reproducible; small example counts keep the file to seconds.
"""
import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from retina_focal.anchors import RetinaFocalAnchorGenerator
from retina_focal.losses import sigmoid_focal_loss
from retina_focal.matching import EveryGTMatcher, build_anchor_matcher

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# ---------------------------------------------------------------- focal loss (§3, eq. 5)

HUGE = torch.tensor(1e30).item()  # 1e30 rounded to float32
logit = st.floats(-HUGE, HUGE, width=32, allow_nan=False, allow_infinity=False)
target = st.integers(0, 1)
alphas = st.one_of(st.floats(0.0, 1.0), st.just(-1.0))  # -1: no α weighting
gammas = st.floats(0.0, 5.0)
logits_and_targets = st.lists(st.tuples(logit, target), min_size=1, max_size=32)


def _tensors(pairs):
    """(M,) float32 logits and (M,) float32 0/1 targets from (logit, target) pairs."""
    x, y = zip(*pairs)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def _alpha_t(targets, alpha):
    """α for positives, 1 - α for negatives, 1 when the weighting is off (α < 0); (M,)."""
    if alpha < 0:
        return torch.ones_like(targets)
    return alpha * targets + (1 - alpha) * (1 - targets)


@SETTINGS
@given(logits_and_targets, alphas, gammas)
@example([(HUGE, 0), (-HUGE, 1), (HUGE, 1), (-HUGE, 0), (1e4, 0), (-1e4, 1)], 0.25, 0.5)
def test_focal_loss_and_gradient_are_finite_and_nonnegative(pairs, alpha, gamma):
    x, y = _tensors(pairs)
    x.requires_grad_(True)
    loss = sigmoid_focal_loss(x, y, alpha, gamma)  # (M,)
    assert torch.isfinite(loss).all() and (loss >= 0).all(), loss
    assert torch.isfinite(sigmoid_focal_loss(x, y, alpha, gamma, reduction="sum"))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(grad).all(), grad


@SETTINGS
@given(logits_and_targets, alphas)
def test_gamma0_is_alpha_balanced_bce(pairs, alpha):
    """γ = 0 gives α-balanced CE (eq. 3), here from torch's own BCE-with-logits."""
    x, y = _tensors(pairs)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none") * _alpha_t(y, alpha)
    # atol only covers losses below 1e-30, where both sides are subnormal floats
    torch.testing.assert_close(sigmoid_focal_loss(x, y, alpha, gamma=0.0), bce, rtol=1e-5, atol=1e-30)


@SETTINGS
@given(st.lists(logit, min_size=2, max_size=32), target, alphas, gammas)
def test_focal_loss_does_not_rise_with_p_t(x_t, y, alpha, gamma):
    """A larger x_t = (2y - 1)·x (a larger p_t, an easier example) never costs more."""
    x_t = torch.tensor(sorted(x_t), dtype=torch.float32)  # (M,) increasing p_t
    targets = torch.full_like(x_t, float(y))
    loss = sigmoid_focal_loss(x_t * (2 * y - 1), targets, alpha, gamma)  # (M,)
    rise = loss[1:] - loss[:-1]  # (M - 1,)
    assert (rise <= 1e-6 * loss[:-1] + 1e-30).all(), (x_t, loss)


@SETTINGS
@given(logits_and_targets, alphas, gammas)
def test_focal_loss_is_at_most_alpha_balanced_ce(pairs, alpha, gamma):
    """(1 - p_t)^γ ≤ 1 (eq. 4): FL never exceeds α_t·CE."""
    x, y = _tensors(pairs)
    ce = sigmoid_focal_loss(x, y, alpha, gamma=0.0)
    assert (sigmoid_focal_loss(x, y, alpha, gamma) <= ce * (1 + 1e-6)).all()


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
