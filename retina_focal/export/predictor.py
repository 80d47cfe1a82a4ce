"""Inference from a config: the model built with weights that must fit (:func:`load_inference_model`),
what detectron2's ``DefaultPredictor`` feeds it (:func:`model_input`), and a predictor for
batches of images (:class:`BatchPredictor`)."""
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

from retina_focal.checkpoint import load_inference_weights
from retina_focal.export.backends import build_inference_model
from retina_focal.modeling.tta import RetinaFocalWithTTA

__all__ = ["BatchPredictor", "inference_model", "load_inference_model", "model_input"]


def load_inference_model(cfg, weights: Optional[str] = None, *, backend: bool = True) -> nn.Module:
    """The model of ``cfg`` ready for inference: built, ``weights`` (default ``MODEL.WEIGHTS``)
    loaded, where every model tensor must come from the file, in eval mode, and run by the
    backend ``TEST.BACKEND.NAME`` unless ``backend`` is False (then the RetinaFocal itself,
    for code that reads its parts). The one place predict, ``--eval-only``, the LazyConfig
    loop (:func:`inference_model`) and the tools build a model to run.

    Raises:
        FileNotFoundError: the weights are empty or name no file.
        ValueError: the weights do not fit the config: a model tensor is not in them, or the
            file is unreadable (RetinaFocalCheckpointer's message).
    """
    return inference_model(build_model(cfg), weights or cfg.MODEL.WEIGHTS, cfg if backend else None)


def inference_model(model: nn.Module, weights: str, cfg=None) -> nn.Module:
    """``model`` with ``weights`` loaded (all of its tensors), in eval mode, run by the backend
    of ``cfg`` (``TEST.BACKEND``) when a cfg is given."""
    load_inference_weights(model, weights)
    model.eval()
    return model if cfg is None else build_inference_model(cfg, model)


def model_input(cfg, image_bgr: np.ndarray) -> torch.Tensor:
    """What detectron2's ``DefaultPredictor`` feeds the model: ``INPUT.FORMAT`` channel order,
    short side resized to ``INPUT.MIN_SIZE_TEST`` (long side at most ``INPUT.MAX_SIZE_TEST``).

    Args:
        image_bgr: (H0, W0, 3) uint8 BGR (``read_usable_image``, ``cv2.imread``).

    Returns:
        (3, H, W) float32, values 0-255.
    """
    image = image_bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image_bgr
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


class BatchPredictor:
    """detectron2's ``DefaultPredictor`` for a batch: a list of BGR images in, one
    ``Instances`` per image out, in original-image pixels.

    Not a ``DefaultPredictor`` subclass: that one takes one image per call and loads the
    weights with ``DetectionCheckpointer``, which leaves tensors missing from the file at
    their random initialization; this one runs a batch per forward pass on the model of
    :func:`load_inference_model` (weights that fit, the configured backend, TTA)."""

    def __init__(self, cfg):
        """The model of :func:`load_inference_model` (``MODEL.WEIGHTS``, the backend
        ``TEST.BACKEND.NAME``); with ``TEST.AUG.ENABLED`` it predicts with test-time
        augmentation."""
        self.cfg = cfg
        self.model = load_inference_model(cfg)
        if cfg.TEST.AUG.ENABLED:
            self.model = RetinaFocalWithTTA.from_config(cfg, self.model)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: each (H, W, 3) uint8 BGR, sizes may differ.
        """
        inputs = [
            {"image": model_input(self.cfg, image), "height": image.shape[0], "width": image.shape[1]} for image in images
        ]
        return [out["instances"].to("cpu") for out in self.model(inputs)]
