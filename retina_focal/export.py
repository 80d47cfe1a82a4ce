"""Export RetinaFocal's network to TorchScript or ONNX; post-process its outputs in Python.

The exported graph is :class:`ExportableRetinaFocal`: one image tensor in (``(1, 3, H, W)``
float, pixel values in ``INPUT.FORMAT`` order, already resized as ``DefaultPredictor``
does: ``retina_focal.predict.model_input(cfg, image_bgr)[None]``), then RetinaFocal's own
``preprocess_image`` (normalization, padding to the backbone's size divisibility),
backbone, head and anchors, and out per FPN level:

* ``logits_<level>`` (1, HiWiA, K) classification logits (before the sigmoid);
* ``deltas_<level>`` (1, HiWiA, 4) box deltas;
* ``anchors_<level>`` (HiWiA, 4) XYXY anchors in input pixels.

Decoding, the score threshold, top-k and NMS stay outside the graph (data-dependent shapes
and ``batched_nms`` do not export cleanly): :func:`postprocess` hands the outputs to the
model's own :meth:`RetinaFocal.inference` and ``detector_postprocess``, so the detections
are computed by the same code as in PyTorch. The anchor generator's per-size cache is
bypassed under tracing (``RetinaFocalAnchorGenerator.forward``), so the anchors follow the
input size in the exported graph too.
"""
import os
import warnings
from contextlib import contextmanager
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

__all__ = ["ONNX_OPSET", "ExportableRetinaFocal", "postprocess", "export_torchscript", "export_onnx"]

ONNX_OPSET = 17  # tested with onnxruntime 1.32 (tests/test_export.py)


class ExportableRetinaFocal(nn.Module):
    """RetinaFocal's network on one image tensor, returning flat per-level tensors.

    ``forward(image)``: image (1, 3, H, W) float32 in ``INPUT.FORMAT`` order, values
    0-255; returns ``3 * L`` tensors (L = number of head levels): L logits (1, HiWiA, K),
    L deltas (1, HiWiA, 4), L anchors (HiWiA, 4).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    @property
    def output_names(self) -> List[str]:
        levels = self.model.head_in_features
        return [f"{kind}_{level}" for kind in ("logits", "deltas", "anchors") for level in levels]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        images = self.model.preprocess_image([{"image": image[0]}])  # (1, 3, H', W'), padded
        anchors, logits, deltas = self.model.predict(images)  # per level (HiWiA, 4), (1, HiWiA, K), (1, HiWiA, 4)
        return tuple(logits) + tuple(deltas) + tuple(a.tensor for a in anchors)


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


@contextmanager
def _tracing():
    """no_grad, and no TracerWarning for detectron2's shape asserts and its empty-Boxes
    reshape (``Boxes.__init__``), which the trace fixes for inputs that always pass them."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_torchscript(exportable: ExportableRetinaFocal, example: Tensor, path: str) -> str:
    """Trace ``exportable`` on ``example`` (1, 3, H, W) and save it to ``path``."""
    with _tracing():
        traced = torch.jit.trace(exportable, (example,), check_trace=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    traced.save(path)
    return path


def export_onnx(exportable: ExportableRetinaFocal, example: Tensor, path: str, opset: int = ONNX_OPSET) -> str:
    """Export ``exportable`` to ONNX (TorchScript-based exporter) with dynamic H and W."""
    names = exportable.output_names
    dynamic_axes = {"image": {2: "height", 3: "width"}}
    dynamic_axes.update({name: {0: "anchors"} if name.startswith("anchors") else {1: "anchors"} for name in names})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _tracing():
        torch.onnx.export(
            exportable,
            (example,),
            path,
            input_names=["image"],
            output_names=names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return path
