"""Export RetinaFocal's network with ``torch.export`` (an ``ExportedProgram``, .pt2) or to ONNX
(through the ``torch.export``-based exporter); post-process its outputs in Python.

The exported program is :class:`ExportableRetinaFocal`: one image tensor in (``(1, 3, H, W)``
float, pixel values in ``INPUT.FORMAT`` order, already resized as ``DefaultPredictor``
does, ``retina_focal.predict.model_input(cfg, image_bgr)[None]``, and padded by
:func:`padded_for_export` to the backbone's size divisibility), then normalization, backbone,
head and anchors, and out per FPN level:

* ``logits_<level>`` (1, HiWiA, K) classification logits (before the sigmoid);
* ``deltas_<level>`` (1, HiWiA, 4) box deltas;
* ``anchors_<level>`` (HiWiA, 4) XYXY anchors in input pixels.

Decoding, the score threshold, top-k and NMS stay outside the program (data-dependent
shapes): :func:`postprocess` hands the outputs to the model's own
:meth:`RetinaFocal.inference` and ``detector_postprocess``, so the detections are computed
by the same code as in PyTorch. H and W are dynamic (:func:`export_dynamic_shapes`), and the
anchor generator's per-size cache is bypassed while exporting, so the anchors follow them.
TorchScript (``torch.jit.trace``) and the TorchScript-based ONNX exporter are gone: torch 2.14
deprecates both.
"""
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

__all__ = [
    "ONNX_OPSET",
    "MAX_DYNAMIC_SIDE",
    "ExportableRetinaFocal",
    "export_dynamic_shapes",
    "export_onnx",
    "export_program",
    "min_dynamic_side",
    "padded_for_export",
    "postprocess",
    "serves_dynamic_shapes",
]

ONNX_OPSET = 17  # tested with onnxruntime 1.32 (tests/export/test_torch_export.py)
MAX_DYNAMIC_SIDE = 4096  # the largest padded side of the dynamic-shape program


class ExportableRetinaFocal(nn.Module):
    """RetinaFocal's network on one image tensor, returning flat per-level tensors.

    ``forward(image)``: image (1, 3, H, W) float32 in ``INPUT.FORMAT`` order, values
    0-255; returns ``3 * L`` tensors (L = number of head levels): L logits (1, HiWiA, K),
    L deltas (1, HiWiA, 4), L anchors (HiWiA, 4).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    @property
    def output_names(self) -> List[str]:
        levels = self.model.head_in_features
        return [f"{kind}_{level}" for kind in ("logits", "deltas", "anchors") for level in levels]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        images = self._preprocessed(image)  # (1, 3, H', W'), padded
        anchors, logits, deltas = self.model.predict(images)  # per level (HiWiA, 4), (1, HiWiA, K), (1, HiWiA, 4)
        return tuple(logits) + tuple(deltas) + tuple(a.tensor for a in anchors)

    def _preprocessed(self, image: Tensor) -> ImageList:
        """The model's ``preprocess_image``. Under ``torch.export`` the image comes padded
        (:func:`padded_for_export`: H and W multiples of the size divisibility, padded with the
        pixel mean), and is only normalized: detectron2's ``ImageList.from_tensors`` turns
        symbolic sizes into constants, and the FPN's top-down sums need sizes that torch.export
        can prove divisible."""
        if not torch.compiler.is_exporting():
            return self.model.preprocess_image([{"image": image[0]}])
        x = (image - self.model.pixel_mean) / self.model.pixel_std  # (1, 3, H, W)
        return ImageList(x, [tuple(x.shape[-2:])])


def padded_for_export(model: nn.Module, image: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
    """``image`` (1, 3, H, W) padded at the bottom and right with the pixel mean (0 after
    normalization, as ``ImageList`` pads) to multiples of the backbone's size divisibility, or
    to ``size`` (H', W') when given: the input of the ``torch.export`` program."""
    d = model.backbone.size_divisibility
    height, width = image.shape[-2:]
    padded_height, padded_width = size or (-(-height // d) * d, -(-width // d) * d)
    padded = model.pixel_mean.view(1, -1, 1, 1).expand(1, -1, padded_height, padded_width).clone()
    padded[..., :height, :width] = image
    return padded


def min_dynamic_side(model: nn.Module) -> int:
    """The smallest padded side of the dynamic-shape program: twice the largest feature stride
    (every level then has at least 2 cells; torch.export specializes a size-1 level into
    another program), rounded up to the size divisibility (256 px for P7)."""
    d = model.backbone.size_divisibility
    largest_stride = max(model.backbone.output_shape()[f].stride for f in model.head_in_features)
    return -(-2 * largest_stride // d) * d


def serves_dynamic_shapes(model: nn.Module, height: int, width: int) -> bool:
    """Whether the dynamic-shape program serves a padded (H, W): both sides from
    :func:`min_dynamic_side` to :data:`MAX_DYNAMIC_SIDE`."""
    return min_dynamic_side(model) <= min(height, width) and max(height, width) <= MAX_DYNAMIC_SIDE


def postprocess(model: nn.Module, outputs: Sequence, input_size: Tuple[int, int], output_size: Tuple[int, int]) -> Instances:
    """The Python step after the exported graph: the model's own §4.1 inference (threshold,
    top-k, decode, class-wise NMS, top 100) and rescaling to the original image.

    Args:
        model: a RetinaFocal built from the same config (only its inference settings and box
            transform are used, not its weights).
        outputs: the exported graph's ``3 * L`` outputs (Tensors or numpy arrays).
        input_size: (H, W) of the image fed to the graph.
        output_size: (H0, W0) of the original image.

    Returns:
        Instances with ``pred_boxes``, ``scores``, ``pred_classes`` in original pixels.
    """
    outputs = [torch.as_tensor(np.asarray(x)) for x in outputs]
    num_levels = len(outputs) // 3
    logits, deltas, anchors = outputs[:num_levels], outputs[num_levels : 2 * num_levels], outputs[2 * num_levels :]
    (result,) = model.inference([Boxes(a) for a in anchors], logits, deltas, [tuple(input_size)])
    return detector_postprocess(result, *output_size)


def export_dynamic_shapes(exportable: ExportableRetinaFocal, example: Tensor) -> Optional[Dict]:
    """torch.export's ``dynamic_shapes`` for H and W: multiples of the backbone's size
    divisibility d, the range of :func:`serves_dynamic_shapes`. None when the padded example is
    outside: the program then serves the example's size only.

    Args:
        example (Tensor): (1, 3, H, W), padded (:func:`padded_for_export`).
    """
    model = exportable.model
    d = model.backbone.size_divisibility
    if not serves_dynamic_shapes(model, *example.shape[-2:]):
        return None
    low, high = min_dynamic_side(model) // d, MAX_DYNAMIC_SIDE // d
    return {"image": {2: d * torch.export.Dim("height", min=low, max=high), 3: d * torch.export.Dim("width", min=low, max=high)}}


def export_program(exportable: ExportableRetinaFocal, example: Tensor, path: str) -> str:
    """``torch.export`` ``exportable`` on ``example`` (1, 3, H, W, resized, not padded) and save
    the ``ExportedProgram`` to ``path`` (.pt2); its input is :func:`padded_for_export`'s."""
    example = padded_for_export(exportable.model, example)
    with torch.no_grad():
        program = torch.export.export(exportable, (example,), dynamic_shapes=export_dynamic_shapes(exportable, example))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(program, path)
    return path


def export_onnx(exportable: ExportableRetinaFocal, example: Tensor, path: str, opset: int = ONNX_OPSET) -> str:
    """ONNX through the ``torch.export``-based exporter (``dynamo=True``): the program of
    :func:`export_program`, with the same input (padded image) and dynamic H and W."""
    example = padded_for_export(exportable.model, example)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dynamic_shapes.*")
        torch.onnx.export(
            exportable,
            (example,),
            path,
            input_names=["image"],
            output_names=exportable.output_names,
            dynamic_shapes=export_dynamic_shapes(exportable, example),
            opset_version=opset,
            dynamo=True,
            external_data=False,  # one file (the weights inside), as the legacy exporter wrote
            verbose=False,
        )
    return path
