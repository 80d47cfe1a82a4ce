"""Inputs shared by the loss tests (tests/modeling/losses/test_*.py)."""
import torch

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


def _gradcheck(loss_module, anchors=None, n=2, r=6, k=2):
    gt, logits = _labels_and_logits(n, r, k, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_module(x, gt, 2.0, anchors=anchors), (logits,))
