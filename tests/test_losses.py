import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes
from fvcore.nn import sigmoid_focal_loss as fvcore_focal_loss
from torch.nn import functional as F

from retina_focal.losses import (
    FocalLoss,
    FocalLossStar,
    OHEMLoss,
    anchor_cross_entropy,
    box_regression_loss,
    build_retina_focal_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_star,
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


# ------------------------------------------------------------- per-class α (FocalLoss)


def _labels_and_logits(n=2, r=40, k=3, dtype=torch.float32):
    """(N, R) labels in {-1, 0..K-1, K} with all three kinds, and (N, R, K) logits."""
    gt = torch.randint(-1, k + 1, (n, r))
    return gt, torch.randn(n, r, k, dtype=dtype) * 3


def _valid_rows(logits, gt):
    """[(logits (K,), 0/1 target (K,))] of the non-ignored anchors, built one by one."""
    k = logits.shape[-1]
    rows = []
    for n, r in zip(*torch.nonzero(gt >= 0, as_tuple=True)):
        target = torch.zeros(k, dtype=logits.dtype)
        if gt[n, r] < k:
            target[gt[n, r]] = 1.0
        rows.append((logits[n, r], target))
    return rows


def test_per_class_alpha_weights_each_class_column():
    gt, logits = _labels_and_logits()
    alpha = [0.1, 0.5, 0.9]
    loss = FocalLoss(alpha=alpha, gamma=2.0)(logits, gt, normalizer=3.0)
    expected = sum(
        fvcore_focal_loss(x[c], t[c], alpha[c], 2.0, "sum") for x, t in _valid_rows(logits, gt) for c in range(3)
    )
    assert loss.item() == pytest.approx(expected.item() / 3.0, rel=1e-5)
    assert FocalLoss(alpha=alpha, gamma=2.0).alpha == (0.1, 0.5, 0.9)


def test_tensor_alpha_equal_to_a_float_gives_the_same_loss():
    logits, targets = _batch(k=4)
    ours = sigmoid_focal_loss(logits, targets, torch.full((4,), 0.75), 1.0)
    torch.testing.assert_close(ours, sigmoid_focal_loss(logits, targets, 0.75, 1.0))


def test_class_alpha_from_config_overrides_focal_loss_alpha():
    loss = build_retina_focal_loss(small_cfg("MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA", [0.2, 0.3, 0.4]))
    assert loss.alpha == (0.2, 0.3, 0.4)
    assert build_retina_focal_loss(small_cfg()).alpha == 0.25  # [] = FOCAL_LOSS_ALPHA
    with pytest.raises(ValueError, match="CLASS_ALPHA.*NUM_CLASSES = 3"):
        build_retina_focal_loss(small_cfg("MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA", [0.2, 0.3]))
    with pytest.raises(ValueError, match="CLASS_ALPHA"):
        build_retina_focal_loss(small_cfg("MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA", [0.2, 1.3, 0.4]))


def test_gamma0_focal_loss_module_is_alpha_balanced_ce():  # Table 1a's baseline
    gt, logits = _labels_and_logits()
    expected = sum(
        F.binary_cross_entropy_with_logits(x, t, weight=0.75 * t + 0.25 * (1 - t), reduction="sum")
        for x, t in _valid_rows(logits, gt)
    )
    assert FocalLoss(alpha=0.75, gamma=0.0)(logits, gt, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------- FL* (Appendix A)

FL_STAR_SETTINGS = [(2.0, 1.0), (4.0, 0.0), (1.0, 0.0), (0.5, -2.0), (3.0, 2.5)]  # (γ, β)


@pytest.mark.parametrize("gamma,beta", FL_STAR_SETTINGS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_fl_star_equals_the_formula_of_appendix_a(gamma, beta, alpha):
    logits, targets = _batch(scale=3.0)  # moderate logits: the direct formula is exact in float64
    y = 2 * targets - 1
    p_star = 1 / (1 + torch.exp(-(gamma * y * logits + beta)))  # eq. 7
    alpha_t = (alpha * targets + (1 - alpha) * (1 - targets)) if alpha >= 0 else 1.0
    expected = -alpha_t * torch.log(p_star) / gamma  # eq. 8
    torch.testing.assert_close(sigmoid_focal_loss_star(logits, targets, alpha, gamma, beta), expected)


@pytest.mark.parametrize("gamma,beta", FL_STAR_SETTINGS)
def test_fl_star_appendix_b_derivative(gamma, beta):
    # dFL*/dx = y (p_t* - 1) (eq. 11), no alpha
    x = torch.linspace(-8, 8, 41, dtype=torch.float64)
    for y01 in (0.0, 1.0):
        xi = x.clone().requires_grad_()
        loss = sigmoid_focal_loss_star(xi, torch.full_like(x, y01), -1, gamma, beta, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xi)
        y = 2 * y01 - 1
        torch.testing.assert_close(grad, y * (torch.sigmoid(gamma * y * x + beta) - 1))


def test_fl_star_with_gamma1_beta0_is_cross_entropy():
    logits, targets = _batch()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss_star(logits, targets, alpha=-1, gamma=1.0, beta=0.0), ce)


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0)])
def test_fl_star_lowers_the_loss_of_well_classified_examples(gamma, beta):
    # Fig. 5: the selected settings lie below CE for every x_t > 0
    x_t = torch.linspace(0.01, 20, 500, dtype=torch.float64)
    fl_star = sigmoid_focal_loss_star(x_t, torch.ones_like(x_t), alpha=-1, gamma=gamma, beta=beta)
    assert (fl_star < F.softplus(-x_t)).all()


@pytest.mark.parametrize("gamma,beta", FL_STAR_SETTINGS)
def test_fl_star_finite_at_extreme_logits(gamma, beta):
    logits = torch.tensor([-1e30, -1e4, -30.0, 0.0, 30.0, 1e4, 1e30]).repeat(2).requires_grad_()
    targets = torch.tensor([0.0] * 7 + [1.0] * 7)
    loss = sigmoid_focal_loss_star(logits, targets, 0.25, gamma, beta)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[8].item() == pytest.approx(0.25 * (gamma * 1e4 - beta) / gamma, rel=1e-6)  # ~ α|x| when wrong


def test_fl_star_module_sums_valid_anchors_and_normalizes():
    gt, logits = _labels_and_logits()
    loss = FocalLossStar(alpha=[0.2, 0.25, 0.3], gamma=4.0, beta=0.0)(logits, gt, normalizer=5.0)
    alpha = torch.tensor([0.2, 0.25, 0.3])
    expected = sum(
        ((alpha * t + (1 - alpha) * (1 - t)) * torch.log1p(torch.exp(-4.0 * (2 * t - 1) * x)) / 4.0).sum()
        for x, t in _valid_rows(logits.double(), gt)
    )
    assert loss.item() == pytest.approx(expected.item() / 5.0, rel=1e-5)


def test_fl_star_from_config_and_its_errors():
    loss = build_retina_focal_loss(
        small_cfg("MODEL.RETINA_FOCAL.LOSS.NAME", "FocalLossStar", "MODEL.RETINA_FOCAL.LOSS.BETA", 0.5,
                  "MODEL.RETINANET.FOCAL_LOSS_GAMMA", 4.0)
    )
    assert isinstance(loss, FocalLossStar) and (loss.alpha, loss.gamma, loss.beta) == (0.25, 4.0, 0.5)
    with pytest.raises(ValueError, match="FOCAL_LOSS_GAMMA must be > 0"):
        FocalLossStar(gamma=0.0)
    with pytest.raises(ValueError, match="LOSS.BETA"):
        FocalLossStar(beta=math.inf)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss_star(torch.zeros(2), torch.zeros(2), gamma=0.0)


# ------------------------------------------------------------------ OHEM (§5.1, Table 1d)


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
# CE: softplus(3), softplus(2.5), softplus(1), softplus(0), (ignored), softplus(-2): hardest a0, a1, a2, a3, a5


@pytest.mark.parametrize(
    "nms_thresh,positive_fraction,expected",
    [
        (0.5, -1.0, [0, 2, 3]),  # a1 suppressed by a0, the ignored a4 never taken
        (0.9, -1.0, [0, 1, 2]),  # a1 survives an NMS at 0.9
        (0.5, 0.34, [0, 2, 3]),  # at most 1 positive: the same
        (0.5, 0.0, [0, 3]),  # no positives, and only two negatives survive
        (0.5, 1.0, [0, 2, 5]),  # positives come first (up to ⌊f·B⌋ = 3): both, then a0
    ],
)
def test_ohem_by_hand(nms_thresh, positive_fraction, expected):
    ohem = OHEMLoss(batch_size=3, nms_thresh=nms_thresh, positive_fraction=positive_fraction)
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
            "MODEL.RETINA_FOCAL.LOSS.OHEM_MAX_CANDIDATES", 1024,
        )
    )
    assert isinstance(loss, OHEMLoss)
    assert (loss.batch_size, loss.nms_thresh, loss.positive_fraction, loss.max_candidates) == (256, 0.7, 0.25, 1024)
    for kwargs, key in [
        ({"batch_size": 0}, "OHEM_BATCH_SIZE"),
        ({"nms_thresh": 1.5}, "OHEM_NMS_THRESH"),
        ({"positive_fraction": 2.0}, "OHEM_POSITIVE_FRACTION"),
        ({"batch_size": 128, "max_candidates": 64}, "OHEM_MAX_CANDIDATES"),
    ]:
        with pytest.raises(ValueError, match=key):
            OHEMLoss(**kwargs)
    with pytest.raises(ValueError, match="anchors"):
        OHEMLoss()(HAND_LOGITS, HAND_LABELS, 1.0)


# ------------------------------------------------------- gradient checks (float64, tiny)


def _gradcheck(loss_module, anchors=None, n=2, r=6, k=2):
    gt, logits = _labels_and_logits(n, r, k, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_module(x, gt, 2.0, anchors=anchors), (logits,))


def test_gradcheck_focal_loss_with_per_class_alpha():
    _gradcheck(FocalLoss(alpha=[0.25, 0.6], gamma=2.0))


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0)])
def test_gradcheck_fl_star(gamma, beta):
    _gradcheck(FocalLossStar(alpha=0.25, gamma=gamma, beta=beta))


@pytest.mark.parametrize("positive_fraction", [-1.0, 0.25])
def test_gradcheck_ohem(positive_fraction):
    _gradcheck(OHEMLoss(batch_size=4, nms_thresh=0.5, positive_fraction=positive_fraction), HAND_ANCHORS.double())


@pytest.mark.parametrize(
    "loss_module",
    [FocalLoss(alpha=[0.2, 0.5, 0.8]), FocalLossStar(), OHEMLoss(batch_size=8, nms_thresh=0.5, positive_fraction=0.25)],
    ids=["FocalLoss", "FocalLossStar", "OHEMLoss"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(loss_module, dtype):  # AMP
    gt, logits = _labels_and_logits(r=6)
    low = logits.to(dtype)
    out = loss_module(low, gt, 2.0, anchors=HAND_ANCHORS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss_module(low.float(), gt, 2.0, anchors=HAND_ANCHORS))
