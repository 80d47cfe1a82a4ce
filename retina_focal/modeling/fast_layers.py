"""Speed transforms of RetinaFocal's layers that change its results by float rounding only.

Applied in one place, :func:`apply_speed_transforms` (the last step of building RetinaFocal);
each has a key that turns it off and is tested against the plain path
(``tests/modeling/test_fast_layers.py``; with all of them and ``FAST_POSTPROCESS`` off,
detections are detectron2's bit for bit):

* ``MODEL.RETINA_FOCAL.FOLD_FROZEN_BN``: every convolution followed by a frozen BatchNorm
  (``MODEL.RESNETS.NORM: FrozenBN``, ImageNet statistics) runs as one convolution
  (:class:`FrozenBNFoldedConv2d`): one pass over the activations instead of two;
* ``MODEL.RETINA_FOCAL.CHANNELS_LAST``: backbone and head in the NHWC memory format, which
  oneDNN (CPU with AVX-512) and tensor cores (GPU) prefer; the head's outputs need no
  transposing copy. Left at None it follows the CPU (:func:`channels_last_by_default`).

The third speed key, ``FAST_POSTPROCESS``, is a choice of post-processing
(retina_focal/modeling/postprocess.py). Mixed precision (``SOLVER.AMP`` / ``TEST.AMP``,
retina_focal/modeling/precision.py) changes the numerics beyond rounding and is chosen per
run, not here. The anchor generator's cache of grid anchors (retina_focal/modeling/anchors.py)
returns the same tensors it would compute.
"""
import logging
from typing import Dict, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BNFoldedConv2d",
    "channels_last_by_default",
    "FoldedFrozenBatchNorm2d",
    "FrozenBNFoldedConv2d",
    "apply_speed_transforms",
    "fold_frozen_batchnorm",
    "to_channels_last",
]

logger = logging.getLogger(__name__)


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
        x = _folded_conv2d(self, self.norm, x)
        return x if self.activation is None else self.activation(x)


def _folded_conv2d(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor) -> Tensor:
    """``norm(conv(x))`` as one convolution (the scale applied to the weight)."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` whose statistics the convolution before it applies
    (:class:`BNFoldedConv2d`): the identity, with the same buffers and state-dict keys."""

    @classmethod
    def replacing(cls, norm: FrozenBatchNorm2d) -> "FoldedFrozenBatchNorm2d":
        folded = cls(norm.num_features, norm.eps)
        for name, buffer in norm.named_buffers(recurse=False):  # the same tensors (num_batches_tracked too, if any)
            folded.register_buffer(name, buffer)
        return folded

    def forward(self, x: Tensor) -> Tensor:
        return x


class BNFoldedConv2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` followed by a ``FrozenBatchNorm2d`` in an ``nn.Sequential`` (as in
    torchvision's models, e.g. MobileNetV2), computed as one convolution. The norm stays in
    the Sequential as a :class:`FoldedFrozenBatchNorm2d` (its keys unchanged); the conv reads
    its statistics without registering it, so no key is added."""

    @classmethod
    def replacing(cls, conv: nn.Conv2d, norm: "FoldedFrozenBatchNorm2d") -> "BNFoldedConv2d":
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        folded.weight, folded.bias = conv.weight, conv.bias  # the same Parameters: optimizers, checkpoints
        folded.folded_norm = (norm,)  # a tuple: not a submodule
        return folded

    def forward(self, x: Tensor) -> Tensor:
        return _folded_conv2d(self, self.folded_norm[0], x)


def fold_frozen_batchnorm(module: nn.Module) -> Dict[str, int]:
    """Fold every frozen BatchNorm below ``module`` into the convolution before it, keeping
    every parameter, buffer and state-dict key: detectron2 ``Conv2d``s with a
    ``FrozenBatchNorm2d`` norm (:class:`FrozenBNFoldedConv2d`), and ``nn.Conv2d`` +
    ``FrozenBatchNorm2d`` pairs in an ``nn.Sequential`` (:class:`BNFoldedConv2d`). Returns how
    many of each were folded."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d)
    ]
    for parent, name, child in targets:
        setattr(parent, name, FrozenBNFoldedConv2d.replacing(child))
    pairs = [
        (sequential, i)
        for sequential in module.modules()
        if isinstance(sequential, nn.Sequential)
        for i in range(len(sequential) - 1)
        if type(sequential[i]) is nn.Conv2d and type(sequential[i + 1]) is FrozenBatchNorm2d
    ]
    for sequential, i in pairs:
        norm = FoldedFrozenBatchNorm2d.replacing(sequential[i + 1])
        sequential[i], sequential[i + 1] = BNFoldedConv2d.replacing(sequential[i], norm), norm
    return {"detectron2 Conv2d with FrozenBN": len(targets), "nn.Conv2d + FrozenBN": len(pairs)}


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


def channels_last_by_default(device_type: str) -> bool:
    """``MODEL.RETINA_FOCAL.CHANNELS_LAST`` left at None: channels-last except on a CPU whose
    widest vector unit torch uses is AVX2. Measured (docs/benchmark.md, "Channels-last by
    CPU"): on an AVX2-only EPYC it slowed training of the GroupNorm demo and of R-50 at batch 1;
    on AVX-512 CPUs (an EPYC, and a Xeon with AMX for both norms, training and inference) it
    sped them up; on CUDA the AMP and float32 training steps use it."""
    return device_type != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX2"


def apply_speed_transforms(backbone: nn.Module, head: nn.Module, *, fold_frozen_bn: bool, channels_last: bool) -> None:
    """The module transforms of this file, in place (``FAST_POSTPROCESS`` is a choice of
    RetinaFocal's ``inference``)."""
    if fold_frozen_bn:
        folded = fold_frozen_batchnorm(backbone)
        logger.info("MODEL.RETINA_FOCAL.FOLD_FROZEN_BN: folded " + ", ".join(f"{n} {kind}" for kind, n in folded.items())
                    + ("" if any(folded.values()) else " (no frozen BatchNorm in the backbone: nothing to fold)"))
    if channels_last:
        to_channels_last(backbone, head)
