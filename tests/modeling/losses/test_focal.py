"""retina_focal/modeling/losses/focal.py: the readable focal loss against fvcore and the paper's formulas
(§3, Appendix A/B), the fused form that trains against the readable one (float64, 1e-12),
per-class α, FL* and their properties (hypothesis)."""
import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_focal_loss
from fvcore.nn import sigmoid_focal_loss_jit
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from retina_focal.modeling.losses import (
    FocalLoss,
    FocalLossStar,
    build_retina_focal_loss,
    class_balanced_alpha,
    focal_loss_sum,
    sigmoid_focal_loss,
    sigmoid_focal_loss_star,
    valid_logits_and_targets,
)
from tests.conftest import small_cfg
from tests.modeling.losses.loss_cases import _gradcheck, _labels_and_logits, _valid_rows

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


def test_gradcheck_focal_loss_with_per_class_alpha():
    _gradcheck(FocalLoss(alpha=[0.25, 0.6], gamma=2.0))


@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0)])
def test_gradcheck_fl_star(gamma, beta):
    _gradcheck(FocalLossStar(alpha=0.25, gamma=gamma, beta=beta))


@pytest.mark.parametrize(
    "loss_module",
    [FocalLoss(alpha=[0.2, 0.5, 0.8]), FocalLossStar()],
    ids=["FocalLoss", "FocalLossStar"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(loss_module, dtype):  # AMP
    gt, logits = _labels_and_logits(r=6)
    low = logits.to(dtype)
    out = loss_module(low, gt, 2.0, anchors=None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss_module(low.float(), gt, 2.0, anchors=None))


def _logits_and_labels(n=3, r=400, k=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, r, k, generator=g, dtype=torch.float64) * 6 - 2
    logits[0, :5] = torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4], dtype=torch.float64).unsqueeze(1)  # saturation
    labels = torch.randint(-1, k + 1, (n, r), generator=g)  # ignored, classes, background K
    return logits.to(dtype).requires_grad_(), labels


def _reference(logits, labels, alpha, gamma, scale=1.0):
    valid, targets = valid_logits_and_targets(logits, labels)
    return scale * sigmoid_focal_loss(valid, targets, alpha, gamma, reduction="sum")


@pytest.mark.parametrize("alpha", [0.25, 0.9, -1.0, "per_class"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_value_and_gradient_equal_the_elementwise_loss(alpha, gamma):
    logits, labels = _logits_and_labels()
    if alpha == "per_class":
        alpha = torch.linspace(0.1, 0.9, logits.shape[-1], dtype=torch.float64)
    ours = focal_loss_sum(logits, labels, alpha, gamma, scale=0.3)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = _reference(logits, labels, alpha, gamma, scale=0.3)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    assert (g_ours[labels < 0] == 0).all()  # ignored anchors get no gradient


def test_float32_matches_fvcore_jit_to_1e_5():
    """The benchmark's claim: same value and gradients as detectron2's loss (fvcore's jit
    version), max |difference| / max |value| < 1e-5, in float32."""
    logits, labels = _logits_and_labels(n=2, r=3000, k=80, dtype=torch.float32)
    labels[labels < 0] = 80  # fvcore has no "ignore": every anchor is scored
    ours = focal_loss_sum(logits, labels, 0.25, 2.0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    valid, targets = valid_logits_and_targets(logits, labels)
    theirs = sigmoid_focal_loss_jit(valid, targets, 0.25, 2.0, "sum")
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert abs(ours.item() - theirs.item()) / theirs.item() < 1e-5
    assert (g_ours - g_theirs).abs().max() / g_theirs.abs().max() < 1e-5


def test_incoming_gradient_scales_and_retained_graph_repeats():
    logits, labels = _logits_and_labels()
    loss = focal_loss_sum(logits, labels)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, logits, retain_graph=True)
    (g1_again,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g3, 3.0 * g1)
    assert torch.equal(g1, g1_again)  # the saved gradient was not scaled in place


def test_gradcheck_float64():
    logits, labels = _logits_and_labels(n=1, r=12, k=3)
    logits = (logits.detach() / 4).requires_grad_()  # away from saturation for finite differences
    assert torch.autograd.gradcheck(lambda x: focal_loss_sum(x, labels, 0.25, 2.0, scale=0.5), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits, labels = _logits_and_labels(dtype=torch.float32)
    low = logits.detach().to(dtype).requires_grad_()
    loss = focal_loss_sum(low, labels)
    (grad,) = torch.autograd.grad(loss, low)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, _reference(low.float(), labels, 0.25, 2.0))


def test_all_ignored_and_all_background():
    logits, labels = _logits_and_labels()
    assert focal_loss_sum(logits, torch.full_like(labels, -1)).item() == 0.0
    background = torch.full_like(labels, logits.shape[-1])
    torch.testing.assert_close(focal_loss_sum(logits, background), _reference(logits, background, 0.25, 2.0))


def test_bad_arguments_are_named():
    logits, labels = _logits_and_labels()
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_loss_sum(logits, labels, gamma=-1.0)
    with pytest.raises(ValueError, match=r"gt_labels \(3, 399\) must be the shape of logits \(3, 400, 7\)"):
        focal_loss_sum(logits, labels[:, 1:])


@pytest.mark.parametrize("alpha", [0.25, "per_class"])
def test_autocast_keeps_the_loss_in_float32(alpha):
    logits, labels = _logits_and_labels(dtype=torch.float32)
    if alpha == "per_class":
        alpha = torch.linspace(0.1, 0.9, logits.shape[-1])
    expected = focal_loss_sum(logits, labels, alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = focal_loss_sum(logits, labels, alpha)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0.0)


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


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


# ---------------------------------------------------------------- focal loss (§3, eq. 5)

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


def test_class_balanced_alpha_gives_the_rare_class_the_larger_alpha():
    alphas = class_balanced_alpha([1000, 10, 100], alpha=0.25, beta=0.999)
    assert alphas[1] > alphas[2] > alphas[0] and all(0 < a <= 1 for a in alphas)
    w = [(1 - 0.999) / (1 - 0.999**n) for n in (1000, 10, 100)]
    assert alphas == pytest.approx([min(1.0, 0.25 * x / (sum(w) / 3)) for x in w], abs=1e-6)
    assert class_balanced_alpha([1000, 10, 100], alpha=0.25, beta=0.0) == [0.25, 0.25, 0.25]  # β = 0: no balancing
    with pytest.raises(ValueError, match=r"CLASS_BALANCED_BETA must be in \[0, 1\)"):
        class_balanced_alpha([1, 2], 0.25, 1.0)
