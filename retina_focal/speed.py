"""Speed: optional transforms of RetinaFocal that change its results by float rounding only.

They are applied in one place, :func:`apply_speed_transforms` (the last step of building
RetinaFocal), each has a key that turns it off, and each is tested against the plain path
(``tests/test_speed.py``; with all of them off, detections are detectron2's bit for bit):

* ``MODEL.RETINA_FOCAL.FOLD_FROZEN_BN``: every convolution followed by a frozen BatchNorm
  (``MODEL.RESNETS.NORM: FrozenBN``, ImageNet statistics) runs as one convolution
  (:class:`FrozenBNFoldedConv2d`): one pass over the activations instead of two;
* ``MODEL.RETINA_FOCAL.CHANNELS_LAST``: backbone and head in the NHWC memory format, which
  oneDNN (CPU) and tensor cores (GPU) prefer; the head's outputs need no transposing copy;
* ``MODEL.RETINA_FOCAL.FAST_POSTPROCESS``: :func:`fast_detections`, §4.1's inference with
  thresholding and ranking on logits, a chunked top-k and NMS truncated exactly, instead of
  detectron2's decoding (RetinaFocal's plain path).

Mixed precision (``SOLVER.AMP`` / ``TEST.AMP``, retina_focal/precision.py) changes the
numerics beyond rounding and is chosen per run, not here. The anchor generator's cache of
grid anchors (retina_focal/anchors.py) returns the same tensors it would compute.
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, batched_nms, cat, nms
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn
from torch.nn import functional as F

from .precision import full_precision

__all__ = [
    "FrozenBNFoldedConv2d",
    "InferenceSettings",
    "apply_speed_transforms",
    "chunked_topk",
    "fast_detections",
    "first_kept_by_nms",
    "fold_frozen_batchnorm",
    "to_channels_last",
]


class FrozenBNFoldedConv2d(Conv2d):
    """detectron2's ``Conv2d`` with a ``FrozenBatchNorm2d`` norm, computed as one convolution:
    BN(W * x + b) = (s·W) * x + s·b + (β - s·μ) with s = γ / sqrt(σ² + ε) per output channel.
    The scale is applied to the weight (C_out x C_in x k x k values) instead of the activations,
    and gradients reach ``weight`` through it. Parameters, buffers and state-dict keys are those
    of the ``Conv2d`` it replaces (:meth:`replacing`); only float rounding differs."""

    @classmethod
    def replacing(cls, conv: Conv2d) -> "FrozenBNFoldedConv2d":
        """A folded conv that holds ``conv``'s own parameters, norm and activation."""
        folded = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            norm=conv.norm,
            activation=conv.activation,
        )
        folded.weight, folded.bias = conv.weight, conv.bias  # the same Parameters: optimizers, checkpoints
        return folded

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        bias = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        x = F.conv2d(x, self.weight * scale.view(-1, 1, 1, 1), bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Replace every detectron2 ``Conv2d`` below ``module`` whose norm is a
    ``FrozenBatchNorm2d`` with a :class:`FrozenBNFoldedConv2d` holding the same parameters
    (same state-dict keys). Returns how many were replaced."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d)
    ]
    for parent, name, child in targets:
        setattr(parent, name, FrozenBNFoldedConv2d.replacing(child))
    return len(targets)


def _to_channels_last(_module: nn.Module, args: Tuple) -> Tuple:
    """Forward pre-hook: the input image batch (N, C, H, W) in the channels-last layout."""
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def to_channels_last(backbone: nn.Module, head: nn.Module) -> None:
    """Backbone and head weights in the channels-last layout, and the backbone's input
    converted to it on every call (a forward pre-hook); the features it passes to the head
    are then channels-last too."""
    backbone.to(memory_format=torch.channels_last)
    head.to(memory_format=torch.channels_last)
    backbone.register_forward_pre_hook(_to_channels_last)


def apply_speed_transforms(backbone: nn.Module, head: nn.Module, *, fold_frozen_bn: bool, channels_last: bool) -> None:
    """The module transforms of this file, in place (``FAST_POSTPROCESS`` is a choice of
    RetinaFocal's ``inference``)."""
    if fold_frozen_bn:
        fold_frozen_batchnorm(backbone)
    if channels_last:
        to_channels_last(backbone, head)


@dataclass(frozen=True)
class InferenceSettings:
    """§4.1 "Inference" with detectron2's keys: scores thresholded at ``score_thresh`` (0.05;
    a float, or one threshold per class), at most ``topk_candidates`` (1000) per level,
    class-wise NMS at ``nms_thresh`` (0.5), ``max_detections`` (100) kept."""

    score_thresh: Union[float, Tuple[float, ...]]
    topk_candidates: int
    nms_thresh: float
    max_detections: int
    class_agnostic_nms: bool


def chunked_topk(values: Tensor, k: int, chunks: int = 16) -> Tuple[Tensor, Tensor]:
    """``values.topk(k)`` of a long 1-D tensor as the top k of ``chunks`` per-chunk top-ks: the
    same elements (the best k are among the best k of their chunks) in sorted order, and the
    chunks run in parallel (one 1-D top-k uses one CPU thread)."""
    n = values.numel()
    if n < 4 * chunks * k:
        return values.topk(k)
    chunk = -(-n // chunks)
    padded = torch.cat([values, values.new_full((chunk * chunks - n,), -math.inf)])
    top, idx = padded.view(chunks, chunk).topk(k, dim=1)  # (chunks, k)
    idx = idx + torch.arange(chunks, device=values.device).unsqueeze(1) * chunk
    top, order = top.flatten().topk(k)
    return top, idx.flatten()[order]


def first_kept_by_nms(boxes: Tensor, scores: Tensor, classes: Tensor, settings: InferenceSettings) -> Tensor:
    """Indices of the ``max_detections`` best boxes that survive NMS (class-wise, or over all
    classes), best first; the same as NMS over all candidates, truncated.

    Greedy NMS decides a box from the better boxes only, so NMS over the C best candidates
    keeps the same first boxes as NMS over all of them; C starts at 4x the detections wanted
    and doubles until enough survive or every candidate is in. Greedy order is score
    descending, ties in input order (a stable sort), and survivors are returned in that
    order, so exact ties are decided the same way at every C (torchvision's NMS is stable,
    but its per-class path for many boxes re-sorts its output unstably).

    Args:
        boxes (Tensor): (M, 4); scores (Tensor): (M,); classes (Tensor): (M,).
    """
    order = scores.argsort(descending=True, stable=True)
    num_candidates = min(len(order), 4 * settings.max_detections)
    while True:
        top = order[:num_candidates]
        if settings.class_agnostic_nms:
            keep = nms(boxes[top], scores[top], settings.nms_thresh)
        else:
            keep = batched_nms(boxes[top], scores[top], classes[top], settings.nms_thresh)
        if len(keep) >= settings.max_detections or num_candidates == len(order):
            return top[keep.sort().values[: settings.max_detections]]  # positions in greedy order
        num_candidates = min(len(order), 2 * num_candidates)


def _candidates_of_level(
    anchors: Tensor, logits: Tensor, deltas: Tensor, logit_thresh: Tensor, topk: int, box2box_transform: Box2BoxTransform
) -> Tuple[Tensor, Tensor, Tensor]:
    """Threshold, keep the top-k (anchor, class) pairs of one level, decode their boxes.

    Args:
        anchors (Tensor): (HWA, 4); logits (Tensor): (HWA, K); deltas (Tensor): (HWA, 4);
        logit_thresh (Tensor): () or (K,), σ^-1 of the score threshold(s).

    Returns:
        boxes (M, 4), logits (M,), classes (M,) with M ≤ ``topk``.
    """
    num_classes = logits.shape[1]
    passing = logits > logit_thresh  # (HWA, K)
    if int(passing.sum()) > topk:  # top-k of the passing scores, no index list
        scores, flat = chunked_topk(torch.where(passing, logits, -math.inf).flatten(), topk)
        anchor_idxs, classes = flat // num_classes, flat % num_classes
    else:  # thresholding first: few candidates, no top-k needed (NMS sorts)
        anchor_idxs, classes = torch.nonzero(passing, as_tuple=True)
        scores = logits[anchor_idxs, classes]
    boxes = box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs])
    return boxes, scores, classes


def fast_detections(
    anchors: Sequence[Boxes],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    image_size: Tuple[int, int],
    settings: InferenceSettings,
    box2box_transform: Box2BoxTransform,
) -> Instances:
    """§4.1's inference for one image, faster than decoding scores (``FAST_POSTPROCESS``).

    Scores are thresholded and ranked as logits (σ is monotonic), so the sigmoid is only
    computed for the detections returned; when more than ``topk_candidates`` pass on a level
    the top-k runs as :func:`chunked_topk`; NMS runs over the best candidates only
    (:func:`first_kept_by_nms`). Same detections as the plain path up to float rounding
    (ties of float32 scores may be ordered differently).

    Args:
        anchors (list[Boxes]): per level (HiWiA, 4); logits, deltas (list[Tensor]): per level
            (HiWiA, K) and (HiWiA, 4) of this image.
        image_size: (h, w) before padding.
    """
    with full_precision(logits[0].device.type):
        logit_thresh = torch.logit(torch.as_tensor(settings.score_thresh, dtype=logits[0].dtype, device=logits[0].device))
        candidates = [
            _candidates_of_level(a.tensor, lg, dl, logit_thresh, settings.topk_candidates, box2box_transform)
            for a, lg, dl in zip(anchors, logits, deltas)
        ]
        boxes, scores, classes = (cat(parts) for parts in zip(*candidates))
        keep = first_kept_by_nms(boxes, scores, classes, settings)
        return Instances(image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep].sigmoid(), pred_classes=classes[keep])
