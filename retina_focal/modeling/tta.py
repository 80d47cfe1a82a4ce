"""Test-time augmentation for RetinaFocal (detectron2's keys ``TEST.AUG.*``; detectron2's own
TTA serves GeneralizedRCNN only).

:class:`RetinaFocalWithTTA` runs the model on the input image resized to each short side of
``TEST.AUG.MIN_SIZES`` (long side at most ``TEST.AUG.MAX_SIZE``) and, with
``TEST.AUG.FLIP``, on its mirror image; every pass returns its detections in the original
image's pixels (the model's own rescaling), mirrored boxes are flipped back, and the union
is merged by class-wise NMS (``MODEL.RETINANET.NMS_THRESH_TEST``), keeping the
``TEST.DETECTIONS_PER_IMAGE`` best. It is a model: ``--eval-only`` and the end of training
evaluate it beside the plain model (results suffixed ``_TTA``), and ``retina-focal-predict``
uses it when ``TEST.AUG.ENABLED``.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from torch import nn

__all__ = ["RetinaFocalWithTTA"]


class RetinaFocalWithTTA(nn.Module):
    """A RetinaFocal evaluated on several scales and flips, merged (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        min_sizes: Sequence[int],
        max_size: int,
        flip: bool,
        nms_thresh: float,
        max_detections: int,
    ):
        super().__init__()
        if not min_sizes:
            raise ValueError("TEST.AUG.MIN_SIZES must name at least one short side")
        self.model = model
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = max_size
        self.flip = flip
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> "RetinaFocalWithTTA":
        return cls(
            model,
            cfg.TEST.AUG.MIN_SIZES,
            cfg.TEST.AUG.MAX_SIZE,
            cfg.TEST.AUG.FLIP,
            cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Inputs as the model's (``image`` (C, H, W), optional ``height``/``width`` of the
        output); outputs ``[{"instances": Instances}]`` in those pixels."""
        return [{"instances": self._merged(x)} for x in batched_inputs]

    def _augmented(self, image: np.ndarray, output_size: Tuple[int, int]) -> List[Tuple[Dict, bool]]:
        """(model input, flipped) for every scale and flip of ``image`` (H, W, C uint8)."""
        inputs = []
        for min_size in self.min_sizes:
            resized = T.ResizeShortestEdge(min_size, self.max_size).get_transform(image).apply_image(image)
            for flipped in (False, True) if self.flip else (False,):
                pixels = resized[:, ::-1] if flipped else resized
                tensor = torch.as_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype("float32"))
                inputs.append(({"image": tensor, "height": output_size[0], "width": output_size[1]}, flipped))
        return inputs

    def _merged(self, x: Dict) -> Instances:
        image = x["image"]
        output_size = (x.get("height", image.shape[1]), x.get("width", image.shape[2]))
        pixels = image.permute(1, 2, 0).cpu().numpy().round().clip(0, 255).astype(np.uint8)
        if pixels.shape[:2] != output_size:  # augment from the image at its original size, as detectron2's TTA
            pixels = T.ResizeTransform(*pixels.shape[:2], *output_size).apply_image(pixels)
        found = []
        for inputs, flipped in self._augmented(pixels, output_size):
            instances = self.model([inputs])[0]["instances"]
            if flipped:
                boxes = instances.pred_boxes.tensor.clone()
                boxes[:, [0, 2]] = output_size[1] - instances.pred_boxes.tensor[:, [2, 0]]
                instances.pred_boxes = Boxes(boxes)
            found.append(instances)
        if len(found) == 1:  # one scale, no flip: the model's own detections
            return found[0]
        merged = Instances.cat(found)
        keep = batched_nms(merged.pred_boxes.tensor, merged.scores, merged.pred_classes, self.nms_thresh)
        return merged[keep[: self.max_detections]]
