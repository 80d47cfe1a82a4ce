"""Property tests (hypothesis) of the loss variants: OHEM's selection (§5.1, Table 1d),
per-class α and FL* (Appendix A).

OHEM is checked against a reference written here from the paper's description (score by
CE, greedy NMS hardest first, take the hardest survivors) with detectron2's
``pairwise_iou``, on float64 inputs so that no two losses tie. Derandomized, small
examples: the file runs in seconds.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import List

import pytest
import torch
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from retina_focal.losses import FocalLoss, OHEMLoss, sigmoid_focal_loss_star

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

# ------------------------------------------------------------------ OHEM (§5.1, Table 1d)


@dataclass
class OHEMProblem:
    logits: torch.Tensor  # (N, R, K) float64
    labels: torch.Tensor  # (N, R) in {-1, 0..K-1, K}
    anchors: torch.Tensor  # (R, 4) float64
    batch_size: int
    nms_thresh: float
    positive_fraction: float
    max_candidates: int

    def loss(self) -> OHEMLoss:
        return OHEMLoss(
            batch_size=self.batch_size,
            nms_thresh=self.nms_thresh,
            positive_fraction=self.positive_fraction,
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


@st.composite
def ohem_problems(draw, positive_fraction=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0])):
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
        max_candidates=draw(st.one_of(st.just(0), st.integers(batch_size, 400))),
    )


def _reference_survivors(p: OHEMProblem, image: int) -> List[int]:
    """Greedy NMS over the valid anchors, hardest first, capped at ``max_candidates``."""
    valid = p.labels[image] >= 0
    order = [a for a in p.reference_ce[image].argsort(descending=True).tolist() if valid[a]]
    if p.max_candidates > 0:
        order = order[: p.max_candidates]
    survivors: List[int] = []
    suppressed = torch.zeros(len(p.anchors), dtype=torch.bool)
    for a in order:
        if not suppressed[a]:
            survivors.append(a)
            suppressed |= p.iou[a] > p.nms_thresh
    return survivors


def _reference_selection(p: OHEMProblem, image: int) -> List[int]:
    survivors = _reference_survivors(p, image)
    if p.positive_fraction < 0:
        return sorted(survivors[: p.batch_size])
    fg = p.foreground[image]
    positives = [a for a in survivors if fg[a]][: int(p.positive_fraction * p.batch_size)]
    negatives = [a for a in survivors if not fg[a]][: p.batch_size - len(positives)]
    return sorted(positives + negatives)


@SETTINGS
@given(ohem_problems())
def test_ohem_selects_at_most_b_valid_anchors_per_image(p):
    selected = p.loss().select(p.logits, p.labels, p.anchors)  # (N, R)
    assert (selected.sum(dim=1) <= p.batch_size).all()
    assert not (selected & (p.labels < 0)).any()


@pytest.mark.parametrize("positive_fraction", [-1.0, 0.0, 0.25, 1.0])
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_ohem_selects_the_hardest_survivors_of_nms(positive_fraction, data):
    p = data.draw(ohem_problems(positive_fraction=st.just(positive_fraction)))
    selected = p.loss().select(p.logits, p.labels, p.anchors)
    for i in range(len(p.labels)):
        assert torch.nonzero(selected[i]).flatten().tolist() == _reference_selection(p, i), i


@SETTINGS
@given(ohem_problems(positive_fraction=st.just(0.25)))
def test_ohem_1_to_3_keeps_the_positive_share_at_most_a_quarter(p):
    selected = p.loss().select(p.logits, p.labels, p.anchors)
    num_positives = (selected & p.foreground).sum(dim=1)
    assert (num_positives <= p.batch_size // 4).all()
    for i in range(len(p.labels)):
        survivors = _reference_survivors(p, i)
        num_negatives = sum(not p.foreground[i, a] for a in survivors)
        if num_negatives >= p.batch_size:  # enough negatives: a full batch, share ≤ 25 %
            assert selected[i].sum() == p.batch_size
            assert num_positives[i] / p.batch_size <= 0.25


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


# ------------------------------------------------------------- per-class α (FocalLoss)


@SETTINGS
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), st.floats(0.0, 5.0), st.integers(0, 2**31 - 1))
def test_per_class_alpha_is_the_sum_of_one_class_losses_with_alpha_k(alphas, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    k = len(alphas)
    labels = torch.randint(-1, k + 1, (2, 30), generator=g)
    logits = torch.randn(2, 30, k, generator=g, dtype=torch.float64) * 4
    ours = FocalLoss(alpha=alphas, gamma=gamma)(logits, labels, normalizer=3.0)
    per_class = []
    for c, alpha in enumerate(alphas):  # column c alone: class c -> 0, any other valid label -> background (1)
        labels_c = torch.where(labels < 0, -1, torch.where(labels == c, 0, 1))
        per_class.append(FocalLoss(alpha=alpha, gamma=gamma)(logits[..., c : c + 1], labels_c, normalizer=3.0))
    torch.testing.assert_close(ours, sum(per_class))


# ------------------------------------------------------------------- FL* (Appendix A)

HUGE = torch.tensor(1e30).item()  # 1e30 rounded to float32


@SETTINGS
@given(
    st.lists(st.floats(-HUGE, HUGE, width=32), min_size=1, max_size=32),
    st.floats(0.05, 5.0),
    st.floats(-10.0, 10.0),
    st.one_of(st.floats(0.0, 1.0), st.just(-1.0)),
)
def test_fl_star_and_its_gradient_are_finite_and_nonnegative(values, gamma, beta, alpha):
    x = torch.tensor(values, dtype=torch.float32).repeat(2).requires_grad_()
    targets = torch.tensor([0.0, 1.0]).repeat_interleave(len(values))
    loss = sigmoid_focal_loss_star(x, targets, alpha, gamma, beta)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and (loss >= 0).all(), loss
    assert torch.isfinite(grad).all() and (grad.abs() <= 1).all(), grad  # |dFL*/dx| = α_t |p_t* - 1| ≤ 1
