"""retina_focal/modeling/losses/ohem.py: OHEM (§5.1, Table 1d) by hand, against a brute-force reference
(hypothesis), its gradient and its config errors."""
from dataclasses import dataclass
from functools import cached_property
from typing import List

import pytest
import torch
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from retina_focal.modeling.losses import (
    OHEMLoss,
    anchor_cross_entropy,
    build_retina_focal_loss,
    sigmoid_focal_loss,
    valid_logits_and_targets,
)
from tests.conftest import small_cfg
from tests.modeling.losses.loss_cases import _gradcheck, _labels_and_logits, _valid_rows

def test_anchor_cross_entropy_is_bce_summed_over_classes():
    gt, logits = _labels_and_logits(dtype=torch.float64)
    ce = anchor_cross_entropy(logits, gt)  # (N, R)
    for (x, t), value in zip(_valid_rows(logits, gt), ce[gt >= 0]):
        assert value.item() == pytest.approx(F.binary_cross_entropy_with_logits(x, t, reduction="sum").item())
    valid, targets = valid_logits_and_targets(logits, gt)
    torch.testing.assert_close(ce[gt >= 0], sigmoid_focal_loss(valid, targets, alpha=-1, gamma=0.0).sum(-1))


# Six anchors in a row; a1 overlaps a0 (IoU 90/110); the others are disjoint. K = 1.
HAND_ANCHORS = torch.tensor(
    [[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10]],
    dtype=torch.float32,
)


HAND_LABELS = torch.tensor([[1, 1, 0, 1, -1, 0]])  # bg, bg, fg, bg, ignored, fg


HAND_LOGITS = torch.tensor([[3.0, 2.5, -1.0, 0.0, 5.0, 2.0]]).unsqueeze(-1)  # (1, 6, 1)


@pytest.mark.parametrize(
    "nms_thresh,positive_fraction,rule,expected",
    [
        (0.5, -1.0, "ssd", [0, 2, 3]),  # a1 suppressed by a0, the ignored a4 never taken
        (0.9, -1.0, "ssd", [0, 1, 2]),  # a1 survives an NMS at 0.9
        (0.5, 0.34, "positive_quota", [0, 2, 3]),  # at most 1 positive (a2), negatives fill to B
        (0.5, 0.34, "ssd", [0, 2]),  # 1 positive allows ⌊0.66 / 0.34⌋ = 1 negative
        (0.5, 0.0, "positive_quota", [0, 3]),  # no positives, and only two negatives survive
        (0.5, 1.0, "positive_quota", [0, 2, 5]),  # positives first (up to ⌊f·B⌋ = 3): both, then a0
        (0.5, 1.0, "ssd", [2, 5]),  # f = 1: no negative per positive
    ],
)
def test_ohem_by_hand(nms_thresh, positive_fraction, rule, expected):
    ohem = OHEMLoss(batch_size=3, nms_thresh=nms_thresh, positive_fraction=positive_fraction, ratio_rule=rule)
    logits = HAND_LOGITS.clone().requires_grad_()
    selected = ohem.select(logits, HAND_LABELS, HAND_ANCHORS)
    assert torch.nonzero(selected[0]).flatten().tolist() == expected
    loss = ohem(logits, HAND_LABELS, normalizer=123.0, anchors=HAND_ANCHORS)  # normalizer unused
    target = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])[expected]
    ce = F.binary_cross_entropy_with_logits(HAND_LOGITS[0, expected, 0], target)  # mean over the selection
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.nonzero(grad[0, :, 0]).flatten().tolist() == expected


def test_ohem_averages_over_the_selection_of_the_whole_batch():
    logits = torch.cat([HAND_LOGITS, HAND_LOGITS])  # (2, 6, 1)
    labels = torch.cat([HAND_LABELS, torch.full_like(HAND_LABELS, -1)])  # image 2: all ignored
    ohem = OHEMLoss(batch_size=3, nms_thresh=0.5)
    assert ohem.select(logits, labels, HAND_ANCHORS).sum(dim=1).tolist() == [3, 0]
    assert ohem(logits, labels, 1.0, HAND_ANCHORS).item() == pytest.approx(
        ohem(HAND_LOGITS, HAND_LABELS, 1.0, HAND_ANCHORS).item()
    )
    logits.requires_grad_()
    nothing = ohem(logits, torch.full_like(labels, -1), 1.0, HAND_ANCHORS)  # no valid anchor at all
    (grad,) = torch.autograd.grad(nothing, logits)
    assert nothing.item() == 0.0 and (grad == 0).all()


def test_ohem_from_config_and_its_errors():
    loss = build_retina_focal_loss(
        small_cfg(
            "MODEL.RETINA_FOCAL.LOSS.NAME", "OHEMLoss",
            "MODEL.RETINA_FOCAL.LOSS.OHEM_BATCH_SIZE", 256,
            "MODEL.RETINA_FOCAL.LOSS.OHEM_NMS_THRESH", 0.7,
            "MODEL.RETINA_FOCAL.LOSS.OHEM_POSITIVE_FRACTION", 0.25,
            "MODEL.RETINA_FOCAL.LOSS.OHEM_RATIO_RULE", "positive_quota",
            "MODEL.RETINA_FOCAL.LOSS.OHEM_MAX_CANDIDATES", 1024,
        )
    )
    assert isinstance(loss, OHEMLoss)
    assert (loss.batch_size, loss.nms_thresh, loss.positive_fraction, loss.ratio_rule, loss.max_candidates) == (
        256, 0.7, 0.25, "positive_quota", 1024
    )
    for kwargs, key in [
        ({"batch_size": 0}, "OHEM_BATCH_SIZE"),
        ({"nms_thresh": 1.5}, "OHEM_NMS_THRESH"),
        ({"positive_fraction": 2.0}, "OHEM_POSITIVE_FRACTION"),
        ({"batch_size": 128, "max_candidates": 64}, "OHEM_MAX_CANDIDATES"),
        ({"positive_fraction": 0.25, "ratio_rule": "half"}, "OHEM_RATIO_RULE must be one of"),
        ({"positive_fraction": 0.0, "ratio_rule": "ssd"}, "allows no positive and so no negative"),
    ]:
        with pytest.raises(ValueError, match=key):
            OHEMLoss(**kwargs)
    with pytest.raises(ValueError, match="anchors"):
        OHEMLoss()(HAND_LOGITS, HAND_LABELS, 1.0)


@pytest.mark.parametrize("positive_fraction", [-1.0, 0.25])
def test_gradcheck_ohem(positive_fraction):
    _gradcheck(OHEMLoss(batch_size=4, nms_thresh=0.5, positive_fraction=positive_fraction), HAND_ANCHORS.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):  # AMP
    loss_module = OHEMLoss(batch_size=8, nms_thresh=0.5, positive_fraction=0.25)
    gt, logits = _labels_and_logits(r=6)
    low = logits.to(dtype)
    out = loss_module(low, gt, 2.0, anchors=HAND_ANCHORS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss_module(low.float(), gt, 2.0, anchors=HAND_ANCHORS))


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


@dataclass
class OHEMProblem:
    logits: torch.Tensor  # (N, R, K) float64
    labels: torch.Tensor  # (N, R) in {-1, 0..K-1, K}
    anchors: torch.Tensor  # (R, 4) float64
    batch_size: int
    nms_thresh: float
    positive_fraction: float
    ratio_rule: str
    max_candidates: int

    def loss(self) -> OHEMLoss:
        return OHEMLoss(
            batch_size=self.batch_size,
            nms_thresh=self.nms_thresh,
            positive_fraction=self.positive_fraction,
            ratio_rule=self.ratio_rule,
            max_candidates=self.max_candidates,
        )

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    @cached_property
    def foreground(self) -> torch.Tensor:
        return (self.labels >= 0) & (self.labels < self.num_classes)

    @cached_property
    def reference_ce(self) -> torch.Tensor:
        """(N, R) BCE with one-hot targets summed over the classes (ignored rows: background)."""
        targets = F.one_hot(self.labels.clamp(min=0), self.num_classes + 1)[..., : self.num_classes]
        targets = targets * self.foreground[..., None]
        return F.binary_cross_entropy_with_logits(self.logits, targets.double(), reduction="none").sum(-1)

    @cached_property
    def iou(self) -> torch.Tensor:
        return pairwise_iou(Boxes(self.anchors), Boxes(self.anchors))  # (R, R)

    def hardness_order(self, image: int) -> List[int]:
        """The valid anchors of ``image``, hardest (highest CE) first."""
        valid = self.labels[image] >= 0
        return [a for a in self.reference_ce[image].argsort(descending=True).tolist() if valid[a]]


@st.composite
def ohem_problems(draw, positive_fraction=st.sampled_from([-1.0, 0.25, 0.5, 1.0]), rule=st.sampled_from(["ssd", "positive_quota"])):
    n, r, k = draw(st.integers(1, 3)), draw(st.integers(50, 300)), draw(st.integers(1, 4))
    batch_size = draw(st.integers(1, 64))
    p_ignore, p_fg = draw(st.floats(0.0, 0.5)), draw(st.floats(0.0, 0.5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # anchors around a few centers, as at the locations of a feature map: many overlap a lot
    centers = torch.rand(draw(st.integers(2, 20)), 2, generator=g, dtype=torch.float64) * 64
    xy = centers[torch.randint(0, len(centers), (r,), generator=g)]
    xy = xy + torch.randn(r, 2, generator=g, dtype=torch.float64)
    wh = 8 + torch.rand(r, 2, generator=g, dtype=torch.float64) * 24
    anchors = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)  # (R, 4)
    u = torch.rand(n, r, generator=g)
    classes = torch.randint(0, k, (n, r), generator=g)
    labels = torch.where(u < p_ignore, -1, torch.where(u < p_ignore + p_fg, classes, k))
    return OHEMProblem(
        logits=torch.randn(n, r, k, generator=g, dtype=torch.float64) * 3,
        labels=labels,
        anchors=anchors,
        batch_size=batch_size,
        nms_thresh=draw(st.floats(0.05, 0.95)),
        positive_fraction=draw(positive_fraction),
        ratio_rule=draw(rule),
        max_candidates=draw(st.one_of(st.just(0), st.integers(batch_size, 400))),
    )


def _reference_survivors(p: OHEMProblem, image: int) -> List[int]:
    """Greedy NMS over all valid anchors, hardest first (no candidate window, no cap)."""
    survivors: List[int] = []
    suppressed = torch.zeros(len(p.anchors), dtype=torch.bool)
    for a in p.hardness_order(image):
        if not suppressed[a]:
            survivors.append(a)
            suppressed |= p.iou[a] > p.nms_thresh
    return survivors


def _reference_selection(p: OHEMProblem, image: int) -> List[int]:
    """The minibatch as §5.1 / SSD describe it, from all survivors: written from the rules'
    text, sharing nothing with the implementation's candidate window."""
    survivors = _reference_survivors(p, image)
    b, f = p.batch_size, p.positive_fraction
    if f < 0:
        return sorted(survivors[:b])
    fg = p.foreground[image]
    positives = [a for a in survivors if fg[a]][: int(f * b)]
    negatives = [a for a in survivors if not fg[a]]
    if p.ratio_rule == "ssd":  # at most (1 - f) / f negatives per positive, B in all
        negatives = negatives[: min(b - len(positives), int(len(positives) * (1 - f) / f + 1e-9))]
    else:  # negatives fill the minibatch
        negatives = negatives[: b - len(positives)]
    return sorted(positives + negatives)


def _within_cap(p: OHEMProblem, image: int, chosen: List[int]) -> bool:
    """Whether every chosen anchor that the cap applies to ranks among the ``max_candidates``
    hardest (the cap's promise: exact whenever the choice lies among them). With a positive
    fraction the cap applies to the negatives only (positives are always exact); without one
    (f < 0) positives and negatives share one window, so it applies to every chosen anchor."""
    if p.max_candidates <= 0:
        return True
    rank = {a: i for i, a in enumerate(p.hardness_order(image))}
    capped = [a for a in chosen if p.positive_fraction < 0 or not p.foreground[image, a]]
    return all(rank[a] < p.max_candidates for a in capped)


@SETTINGS
@given(ohem_problems())
def test_ohem_selects_at_most_b_valid_anchors_per_image(p):
    selected = p.loss().select(p.logits, p.labels, p.anchors)  # (N, R)
    assert (selected.sum(dim=1) <= p.batch_size).all()
    assert not (selected & (p.labels < 0)).any()


@pytest.mark.parametrize("rule", ["ssd", "positive_quota"])
@pytest.mark.parametrize("positive_fraction", [-1.0, 0.25, 1.0])
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_ohem_equals_a_brute_force_reference(positive_fraction, rule, data):
    """Positives always exact (also below OHEM_MAX_CANDIDATES); negatives exact whenever the
    reference's lie within the cap."""
    p = data.draw(ohem_problems(positive_fraction=st.just(positive_fraction), rule=st.just(rule)))
    selected = p.loss().select(p.logits, p.labels, p.anchors)
    for i in range(len(p.labels)):
        got, expected = torch.nonzero(selected[i]).flatten().tolist(), _reference_selection(p, i)
        if positive_fraction >= 0:
            assert [a for a in got if p.foreground[i, a]] == [a for a in expected if p.foreground[i, a]], i
        if _within_cap(p, i, expected):
            assert got == expected, i


def test_positives_ranked_below_the_cap_are_still_chosen():
    """The review's case: with a positive share, NMS 0.5 keeps few positives, so the window
    used to stop at OHEM_MAX_CANDIDATES and never reach the easier positives below it."""
    r = 400
    anchors = torch.tensor([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(r)])  # disjoint: NMS keeps all
    labels = torch.full((1, r), 1)  # K = 1: background
    labels[0, 300:310] = 0  # 10 positives, the easiest anchors (ranked 300-309 by CE)
    logits = torch.full((1, r, 1), 2.0)
    logits[0, :300, 0] = torch.linspace(6.0, 3.0, 300)  # hard negatives
    logits[0, 300:310, 0] = 2.0  # positives with a small loss
    for rule in ("ssd", "positive_quota"):
        ohem = OHEMLoss(batch_size=16, nms_thresh=0.5, positive_fraction=0.25, ratio_rule=rule, max_candidates=64)
        selected = ohem.select(logits, labels, anchors)[0]
        assert int(selected[300:310].sum()) == 4, rule  # ⌊0.25 · 16⌋ positives, beyond the 64 cap


@SETTINGS
@given(ohem_problems(positive_fraction=st.just(0.25)))
def test_ohem_1_to_3_keeps_the_positive_share_at_most_a_quarter(p):
    selected = p.loss().select(p.logits, p.labels, p.anchors)
    num_positives = (selected & p.foreground).sum(dim=1)
    num_negatives = selected.sum(dim=1) - num_positives
    assert (num_positives <= p.batch_size // 4).all()
    if p.ratio_rule == "ssd":
        assert (num_negatives <= 3 * num_positives).all()


@SETTINGS
@given(ohem_problems())
def test_ohem_gradient_flows_only_through_the_selection_and_the_loss_is_their_mean_ce(p):
    logits = p.logits.clone().requires_grad_()
    ohem = p.loss()
    loss = ohem(logits, p.labels, normalizer=7.0, anchors=p.anchors)
    (grad,) = torch.autograd.grad(loss, logits)
    selected = ohem.select(p.logits, p.labels, p.anchors)
    assert (grad[~selected] == 0).all()
    assert (grad[selected] != 0).all()  # sigmoid(x) - t is never 0 at finite x
    expected = p.reference_ce[selected].sum() / max(int(selected.sum()), 1)
    torch.testing.assert_close(loss, expected)
