"""Online hard example mining (OHEM), the baseline the focal loss is compared with (§5.1, Table 1d)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.layers import nms
from torch import Tensor, nn
from torch.nn import functional as F

from retina_focal.modeling.losses.registry import RETINA_FOCAL_LOSS_REGISTRY

__all__ = ["RATIO_RULES", "MinibatchRule", "OHEMLoss", "anchor_cross_entropy", "select_hard_examples"]


def anchor_cross_entropy(logits: Tensor, gt_labels: Tensor) -> Tensor:
    """Sigmoid CE of each anchor, summed over its K class columns (FL with γ = 0, no α).

    With BCE(x, t) = softplus(x) - t·x: CE = Σ_k softplus(x_k) - x_label for a foreground
    anchor, Σ_k softplus(x_k) for background. No one-hot (N, R, K) target is formed.

    Args:
        logits (Tensor): (..., K); half/bfloat16 computed in float32.
        gt_labels (Tensor): (...) in {-1, 0..K-1, K}; ignored anchors (-1) are scored as
            background, so mask them out.

    Returns:
        Tensor: (...), float32 (float64 for float64 logits).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_classes = x.shape[-1]
    label_logit = x.gather(-1, gt_labels.clamp(0, num_classes - 1).unsqueeze(-1)).squeeze(-1)  # (...)
    foreground = (gt_labels >= 0) & (gt_labels < num_classes)
    return F.softplus(x).sum(-1) - label_logit * foreground


# OHEM_RATIO_RULE: how the minibatch keeps a positive share f = OHEM_POSITIVE_FRACTION.
RATIO_RULES = ("ssd", "positive_quota")


@dataclass(frozen=True)
class MinibatchRule:
    """How many anchors of each kind one image's OHEM minibatch takes from the NMS survivors,
    hardest first (§5.1; B = ``batch_size``, f = ``positive_fraction``):

    * f < 0, "OHEM": the B hardest survivors, whatever their kind;
    * ``"ssd"``, "OHEM 1:3" as in SSD [22] (§5.1: "the minibatch is constructed to enforce a
      1:3 ratio between positives and negatives"): at most ⌊f·B⌋ positives and at most
      (1 − f)/f negatives per chosen positive (3 for f = 0.25), so an image with few
      positives trains on a smaller minibatch;
    * ``"positive_quota"``: at most ⌊f·B⌋ positives, negatives fill the minibatch to B.

    ⌊·⌋ as in detectron2's ``subsample_labels``: the positive share never exceeds f.
    """

    batch_size: int
    positive_fraction: float = -1.0
    ratio_rule: str = "ssd"

    @property
    def max_positives(self) -> int:
        return int(self.positive_fraction * self.batch_size)

    def num_negatives(self, num_positives: int) -> int:
        """Negatives wanted beside ``num_positives`` chosen positives (f ≥ 0)."""
        room = self.batch_size - num_positives
        if self.ratio_rule == "positive_quota":
            return room
        f = self.positive_fraction
        return min(room, math.floor(num_positives * (1 - f) / f + 1e-9))

    def choose(self, survivors: Tensor, is_foreground: Tensor, all_positives_in: bool, all_in: bool):
        """The minibatch from ``survivors`` (hardest first) of the C hardest anchors.

        Args:
            is_foreground (Tensor): bool per survivor.
            all_positives_in (bool): the C anchors hold every valid foreground anchor.
            all_in (bool): the C anchors are all the valid anchors.

        Returns:
            (Tensor, bool, bool): the chosen indices (positives first), and whether the
            positives and the negatives are final: survivors of harder anchors come first, so
            more candidates could only add survivors after these.
        """
        if self.positive_fraction < 0:
            return survivors[: self.batch_size], True, all_in or len(survivors) >= self.batch_size
        positives, negatives = survivors[is_foreground], survivors[~is_foreground]
        num_positives = min(len(positives), self.max_positives)
        num_negatives = self.num_negatives(num_positives)
        chosen = torch.cat([positives[:num_positives], negatives[:num_negatives]])
        positives_final = all_positives_in or len(positives) >= self.max_positives
        return chosen, positives_final, all_in or len(negatives) >= num_negatives


def _hardest_survivors(
    scores: Tensor, foreground: Tensor, anchors: Tensor, nms_thresh: float, rule: MinibatchRule, max_candidates: int
) -> Tensor:
    """OHEM's choice in one image; see :func:`select_hard_examples`.

    Greedy NMS visits boxes hardest first and a box's fate depends only on harder boxes,
    so the survivors among the C hardest anchors are exactly the survivors of NMS over all
    anchors down to the C-th loss. C therefore starts at 2·B and doubles until the choice
    is final (:meth:`MinibatchRule.choose`). ``max_candidates`` stops the doubling for the
    negatives only: while positives are wanted and some lie further down, C keeps growing,
    so positives are always chosen exactly (with f ≥ 0; with f < 0 every anchor is in the one
    capped window). (torchvision's NMS over all ~113k anchors of a
    600x1000 image takes 7-60 s on a CPU; over 256-4096 candidates, 1-80 ms.)

    Args:
        scores (Tensor): (R,) anchor losses, -inf at ignored anchors.
        foreground (Tensor): (R,) bool, valid foreground anchors.

    Returns:
        Tensor: (S,) indices in [0, R), S ≤ ``batch_size``, hardest first per kind.
    """
    num_valid = int(torch.isfinite(scores).sum())
    num_positives = int(foreground.sum())
    cap = num_valid if max_candidates <= 0 else min(num_valid, max_candidates)
    num_candidates = min(2 * rule.batch_size, num_valid)
    while True:
        top_losses, top_idx = scores.topk(num_candidates)  # (C,), hardest first
        keep = nms(anchors[top_idx], top_losses.to(anchors.dtype), nms_thresh)  # hardest first
        survivors = top_idx[keep]
        all_positives_in = int(foreground[top_idx].sum()) == num_positives
        chosen, positives_final, negatives_final = rule.choose(
            survivors, foreground[survivors], all_positives_in, num_candidates == num_valid
        )
        if positives_final and (negatives_final or num_candidates >= cap):
            return chosen
        num_candidates = min(2 * num_candidates, num_valid)


def select_hard_examples(
    losses: Tensor,
    valid: Tensor,
    foreground: Tensor,
    anchors: Tensor,
    *,
    batch_size: int,
    nms_thresh: float,
    positive_fraction: float = -1.0,
    ratio_rule: str = "ssd",
    max_candidates: int = 4096,
) -> Tensor:
    """Online hard example mining (OHEM [31], §5.1): the anchors each image trains on.

    Per image: NMS over the boxes of the valid anchors with their loss as score (IoU >
    ``nms_thresh`` suppressed), then the highest-loss survivors as :class:`MinibatchRule`
    says: the B hardest, or with ``positive_fraction`` f ≥ 0 ("OHEM 1:3": f = 0.25) a
    positive share by ``ratio_rule``.

    Args:
        losses (Tensor): (N, R) loss of each anchor, the hardness score; no gradient needed.
        valid (Tensor): (N, R) bool, non-ignored anchors; the others are never selected.
        foreground (Tensor): (N, R) bool, anchors assigned to a ground-truth box.
        anchors (Tensor): (R, 4) XYXY boxes, the same for every image.
        batch_size (int): B ≥ 1, anchors per image.
        nms_thresh (float): IoU threshold in [0, 1].
        positive_fraction (float): f in [0, 1] ((0, 1] for "ssd"), or < 0 for no ratio.
        ratio_rule (str): one of :data:`RATIO_RULES`.
        max_candidates (int): NMS sees at most this many highest-loss anchors per image
            when choosing negatives (0: all); with a positive fraction (f ≥ 0) positives are
            always chosen exactly, negatives whenever the choice lies among them; without one
            (f < 0) positives and negatives compete in the same window, exact whenever the
            choice lies among the capped candidates.

    Returns:
        Tensor: (N, R) bool, at most B selected anchors per image.
    """
    rule = MinibatchRule(batch_size, positive_fraction, ratio_rule)
    scores = losses.masked_fill(~valid, -math.inf)  # (N, R)
    selected = torch.zeros_like(valid)
    for i in range(len(valid)):  # NMS is per image
        chosen = _hardest_survivors(scores[i], foreground[i] & valid[i], anchors, nms_thresh, rule, max_candidates)
        selected[i, chosen] = True
    return selected


def _check_ohem(batch_size: int, nms_thresh: float, positive_fraction: float, ratio_rule: str, max_candidates: int) -> None:
    key = "MODEL.RETINA_FOCAL.LOSS.OHEM_"
    if batch_size < 1:
        raise ValueError(f"{key}BATCH_SIZE must be >= 1, got {batch_size}")
    if not 0.0 <= nms_thresh <= 1.0:
        raise ValueError(f"{key}NMS_THRESH must be in [0, 1], got {nms_thresh}")
    if not math.isfinite(positive_fraction) or positive_fraction > 1:
        raise ValueError(f"{key}POSITIVE_FRACTION must be in [0, 1], or negative for no ratio, got {positive_fraction}")
    if ratio_rule not in RATIO_RULES:
        raise ValueError(f"{key}RATIO_RULE must be one of {list(RATIO_RULES)}, got {ratio_rule!r}")
    if ratio_rule == "ssd" and positive_fraction == 0:
        raise ValueError(
            f"{key}POSITIVE_FRACTION 0 with {key}RATIO_RULE 'ssd' allows no positive and so no negative; "
            f"use a fraction in (0, 1], or {key}RATIO_RULE positive_quota"
        )
    if 0 < max_candidates < batch_size:
        raise ValueError(
            f"{key}MAX_CANDIDATES must be 0 (all) or >= {key}BATCH_SIZE = {batch_size}, got {max_candidates}"
        )


@RETINA_FOCAL_LOSS_REGISTRY.register()
class OHEMLoss(nn.Module):
    """Cross entropy on hard examples mined online: the OHEM baselines of §5.1, Table 1d.

    Each non-ignored anchor is scored by its CE (:func:`anchor_cross_entropy`: sigmoid BCE
    summed over the K classes, the focal loss with γ = 0 and no α), and
    :func:`select_hard_examples` picks per image the B highest-loss survivors of NMS, or
    with a positive fraction the minibatch of :class:`MinibatchRule` ("OHEM 1:3").
    Selection runs without gradient; only the selected anchors get one.

    Normalization (the paper does not say): the CE summed over the selected anchors of the
    batch, divided by their number, i.e. the mean over the minibatch as in OHEM [31] and
    Fast R-CNN, whose loss averages over the sampled RoIs. The ``normalizer`` (foreground
    anchors among all ~100k) is unused: the loss covers only the selected minibatch, which
    in plain OHEM may hold few or no positives, and dividing by the image's foreground count
    would tie the CE's scale to the number of objects instead of to the minibatch. The box
    loss is unaffected (still divided by the foreground count).
    """

    @configurable
    def __init__(
        self,
        *,
        batch_size: int = 128,
        nms_thresh: float = 0.5,
        positive_fraction: float = -1.0,
        ratio_rule: str = "ssd",
        max_candidates: int = 4096,
    ):
        """
        Args:
            batch_size (int): anchors per image, B; Table 1d: 128, 256, 512.
            nms_thresh (float): NMS IoU threshold; Table 1d: 0.5, 0.7.
            positive_fraction (float): the positive share f (0.25 = 1:3), < 0: none. Best in
                Table 1d: B = 128, NMS 0.5, no ratio (32.8 AP).
            ratio_rule (str): how f is kept, :class:`MinibatchRule`; "ssd" for Table 1d's
                "OHEM 1:3" rows.
            max_candidates (int): highest-loss anchors per image that NMS may see when
                choosing negatives (0: all).
        """
        super().__init__()
        _check_ohem(batch_size, nms_thresh, positive_fraction, ratio_rule, max_candidates)
        self.batch_size = batch_size
        self.nms_thresh = nms_thresh
        self.positive_fraction = positive_fraction
        self.ratio_rule = ratio_rule
        self.max_candidates = max_candidates

    @classmethod
    def from_config(cls, cfg):
        loss_cfg = cfg.MODEL.RETINA_FOCAL.LOSS
        return {
            "batch_size": loss_cfg.OHEM_BATCH_SIZE,
            "nms_thresh": loss_cfg.OHEM_NMS_THRESH,
            "positive_fraction": loss_cfg.OHEM_POSITIVE_FRACTION,
            "ratio_rule": loss_cfg.OHEM_RATIO_RULE,
            "max_candidates": loss_cfg.OHEM_MAX_CANDIDATES,
        }

    def forward(
        self, logits: Tensor, gt_labels: Tensor, normalizer: float, anchors: Optional[Tensor] = None
    ) -> Tensor:
        """See ``RETINA_FOCAL_LOSS_REGISTRY``; ``anchors`` is required, ``normalizer`` unused."""
        if anchors is None:
            raise ValueError("OHEMLoss needs the (R, 4) anchors for its NMS")
        with torch.no_grad():
            selected = self.select(logits, gt_labels, anchors)  # (N, R)
        loss = anchor_cross_entropy(logits[selected], gt_labels[selected]).sum()
        return loss / selected.sum().clamp(min=1)

    def select(self, logits: Tensor, gt_labels: Tensor, anchors: Tensor) -> Tensor:
        """(N, R) bool: the anchors the loss trains on (arguments as in ``forward``)."""
        valid = gt_labels >= 0  # (N, R)
        foreground = valid & (gt_labels < logits.shape[-1])
        return select_hard_examples(
            anchor_cross_entropy(logits, gt_labels),
            valid,
            foreground,
            anchors,
            batch_size=self.batch_size,
            nms_thresh=self.nms_thresh,
            positive_fraction=self.positive_fraction,
            ratio_rule=self.ratio_rule,
            max_candidates=self.max_candidates,
        )

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, nms_thresh={self.nms_thresh}, "
            f"positive_fraction={self.positive_fraction}, ratio_rule={self.ratio_rule!r}, "
            f"max_candidates={self.max_candidates}"
        )
