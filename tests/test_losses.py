import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes
from fvcore.nn import sigmoid_focal_loss as fvcore_focal_loss
from torch.nn import functional as F

from retina_focal.losses import (
    FocalLoss,
    box_regression_loss,
    build_retina_focal_loss,
    sigmoid_focal_loss,
    valid_logits_and_targets,
)
from tests.conftest import small_cfg


def _batch(m=500, k=7, scale=4.0):
    logits = (torch.randn(m, k, dtype=torch.float64) * scale).requires_grad_()
    targets = (torch.rand(m, k) < 0.1).double()
    return logits, targets


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_values_and_gradients_equal_fvcore(alpha, gamma, reduction):
    logits, targets = _batch()
    ours = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    theirs = fvcore_focal_loss(logits, targets, alpha, gamma, reduction)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)  # fvcore: fp32
    # fvcore's sigmoid(x) - t cancels in float32 near saturation; ours does not
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


def _fl_over_ce(p_t, gamma=2.0):
    x = torch.logit(torch.tensor([p_t], dtype=torch.float64))
    fl = sigmoid_focal_loss(x, torch.ones(1), alpha=-1, gamma=gamma)
    ce = F.binary_cross_entropy_with_logits(x.float(), torch.ones(1))
    return (ce / fl).item()


def test_paper_downweighting_factors():
    # §3.2: with gamma = 2, p_t = 0.9 has 100x lower loss than CE, p_t ~ 0.968 ~1000x
    assert _fl_over_ce(0.9) == pytest.approx(100.0, rel=1e-4)
    assert _fl_over_ce(0.968) == pytest.approx(1000.0, rel=0.03)
    # ... and misclassified examples (p_t <= .5) are scaled down by at most 4x
    assert _fl_over_ce(0.5) == pytest.approx(4.0, rel=1e-4)
    assert _fl_over_ce(0.2) < 4.0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_appendix_b_derivative(gamma):
    # dFL/dx = y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1), y in {-1, 1}, no alpha
    x = torch.linspace(-8, 8, 41, dtype=torch.float64)
    for y01 in (0.0, 1.0):
        xi = x.clone().requires_grad_()
        loss = sigmoid_focal_loss(xi, torch.full_like(x, y01), alpha=-1, gamma=gamma, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xi)
        y = 2 * y01 - 1
        p_t = torch.sigmoid(y * x)
        expected = y * (1 - p_t) ** gamma * (gamma * p_t * torch.log(p_t) + p_t - 1)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 2.0, 5.0])
def test_finite_at_extreme_logits(gamma):
    logits = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]).repeat(2).requires_grad_()
    targets = torch.tensor([0.0] * 7 + [1.0] * 7)
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=gamma)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[7].item() == pytest.approx(0.25 * 1e4 * 1.0, rel=1e-6)  # hard positive: ~ alpha*|x|


def test_never_above_cross_entropy_and_half_of_it_at_gamma0_alpha_half():
    logits, targets = _batch()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert (sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0) <= ce + 1e-6).all()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=0.0), 0.5 * ce)


def test_rejects_unknown_reduction_and_negative_gamma():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, x, gamma=-1.0)


def test_float64_stays_float64_for_gradcheck():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(6, 3) < 0.3).double()
    assert torch.autograd.gradcheck(lambda v: sigmoid_focal_loss(v, t, 0.25, 2.0, "sum"), (x,))


def test_half_precision_inputs_are_computed_in_float32():
    x = torch.randn(64, 3).half()
    t = (torch.rand(64, 3) < 0.2).half()
    out = sigmoid_focal_loss(x, t, 0.25, 2.0, reduction="sum")
    assert out.dtype == torch.float32
    expected = fvcore_focal_loss(x.float(), t.float(), 0.25, 2.0, reduction="sum")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_focal_loss_module_sums_valid_anchors_and_normalizes():
    logits = torch.randn(2, 6, 3)
    gt = torch.tensor([[0, 1, 3, -1, 3, 2], [3, 3, -1, -1, 0, 3]])  # K = 3 is background
    loss = FocalLoss(alpha=0.25, gamma=2.0)(logits, gt, normalizer=4.0)
    rows = []
    for n, r in zip(*torch.nonzero(gt >= 0, as_tuple=True)):
        target = torch.zeros(3)
        if gt[n, r] < 3:
            target[gt[n, r]] = 1.0
        rows.append(fvcore_focal_loss(logits[n, r], target, 0.25, 2.0, "sum"))
    assert loss.item() == pytest.approx(sum(rows).item() / 4.0, rel=1e-6)
    valid, targets = valid_logits_and_targets(logits, gt)
    assert valid.shape == (9, 3) and targets.sum().item() == 4  # 4 foreground anchors


def test_loss_is_chosen_by_config_with_its_parameters():
    loss = build_retina_focal_loss(small_cfg("MODEL.RETINANET.FOCAL_LOSS_GAMMA", 1.5, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", 0.5))
    assert isinstance(loss, FocalLoss) and (loss.alpha, loss.gamma) == (0.5, 1.5)
    with pytest.raises(KeyError, match="FocalLoss"):
        build_retina_focal_loss(small_cfg("MODEL.RETINA_FOCAL.LOSS.NAME", "Nope"))
    with pytest.raises(ValueError, match="FOCAL_LOSS_ALPHA"):
        FocalLoss(alpha=1.5, gamma=2.0)
    with pytest.raises(ValueError, match="FOCAL_LOSS_GAMMA"):
        FocalLoss(alpha=0.25, gamma=-2.0)


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
