"""focal_loss_sum (loss and gradient in one pass, from anchor labels) against the elementwise
sigmoid_focal_loss on one-hot targets, which is itself checked against fvcore and formulas."""
import pytest
import torch
from fvcore.nn import sigmoid_focal_loss_jit

from retina_focal.losses import focal_loss_sum, sigmoid_focal_loss, valid_logits_and_targets


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
