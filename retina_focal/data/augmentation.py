"""Training augmentation by config key, for small datasets (the fine-tuning recipes of
configs/Custom/).

With the retina_focal keys at their defaults the list is detectron2's own
(``DatasetMapper(cfg, is_train=True)``): ``INPUT.CROP`` (a random crop first), the
multi-scale resize (``INPUT.MIN_SIZE_TRAIN`` with ``MIN_SIZE_TRAIN_SAMPLING`` "choice" or
"range") and ``INPUT.RANDOM_FLIP``; the paper trains COCO with the horizontal flip only
(§4.1). retina_focal adds:

* ``INPUT.SCALE_JITTER``: instead of the resize and the crop above, the image is scaled to fit
  a ``SIZE`` x ``SIZE`` square times a factor drawn from ``RANGE``, and a square of at most
  ``SIZE`` px is cropped from it at random (detectron2's ``ResizeScale`` + ``FixedSizeCrop``,
  the "large scale jitter" of Ghiasi et al., CVPR 2021). Every batch then costs the same, at
  most ``SIZE`` x ``SIZE`` per image, whatever the image's shape;
* ``INPUT.RANDOM_FLIP "both"``: horizontal and vertical flips, each with probability 0.5, for
  pictures without an up (aerial, microscope, sky images);
* ``INPUT.COLOR_JITTER.BRIGHTNESS / CONTRAST / SATURATION``: δ > 0 scales the image's
  brightness, its contrast around the mean grey, or its saturation around each pixel's grey
  by a factor drawn from [1 - δ, 1 + δ] (0 = off); the grey weighs the channels in
  ``INPUT.FORMAT``'s order.

The yaml trainer's mapper (``data.mapper.build_train_mapper``) uses this list; a LazyConfig
names its augmentations in its own ``dataloader.train.mapper``.
"""
from typing import List

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["FLIPS", "FormatAwareSaturation", "build_train_augmentation", "detectron2_view"]

FLIPS = ("none", "horizontal", "vertical", "both")
# ITU-R 601 luma weights of R, G, B (those of detectron2's RandomSaturation and PIL).
LUMA_RGB = np.array([0.299, 0.587, 0.114])


class FormatAwareSaturation(T.RandomSaturation):
    """detectron2's ``RandomSaturation`` (which assumes RGB) for an image in ``image_format``
    ("RGB" or "BGR"): the grey it blends towards weighs each channel by its own luma weight."""

    def __init__(self, intensity_min: float, intensity_max: float, image_format: str = "RGB"):
        super().__init__(intensity_min, intensity_max)
        self.weights = LUMA_RGB if image_format == "RGB" else LUMA_RGB[::-1].copy()

    def get_transform(self, image: np.ndarray) -> T.Transform:
        w = np.random.uniform(self.intensity_min, self.intensity_max)
        grey = image.dot(self.weights)[:, :, np.newaxis]
        return T.BlendTransform(src_image=grey, src_weight=1 - w, dst_weight=w)


def _check(cfg) -> None:
    """Errors naming the key, before any image is read."""
    if cfg.INPUT.RANDOM_FLIP not in FLIPS:
        raise ValueError(f"INPUT.RANDOM_FLIP must be one of {list(FLIPS)}, got {cfg.INPUT.RANDOM_FLIP!r}")
    jitter = cfg.INPUT.COLOR_JITTER
    for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        if not 0 <= jitter[key] < 1:
            raise ValueError(f"INPUT.COLOR_JITTER.{key} must be in [0, 1) (a factor in [1 - δ, 1 + δ]), got {jitter[key]}")
    scale = cfg.INPUT.SCALE_JITTER
    if scale.ENABLED:
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError("INPUT.SCALE_JITTER.ENABLED and INPUT.CROP.ENABLED: the scale jitter crops already; turn one off")
        if len(scale.RANGE) != 2 or not 0 < scale.RANGE[0] <= scale.RANGE[1] or scale.SIZE <= 0:
            raise ValueError(
                f"INPUT.SCALE_JITTER.RANGE must be (min, max) with 0 < min <= max and SIZE > 0, got {tuple(scale.RANGE)}, {scale.SIZE}"
            )
    if jitter.SATURATION > 0 and cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ValueError(
            f"INPUT.COLOR_JITTER.SATURATION {jitter.SATURATION} needs colour images, but INPUT.FORMAT is {cfg.INPUT.FORMAT!r}"
        )


def _scale_jitter(cfg) -> List[T.Augmentation]:
    jitter = cfg.INPUT.SCALE_JITTER
    size = jitter.SIZE
    # pad=False: the model pads the batch with zeros after normalization (the mean colour)
    return [T.ResizeScale(jitter.RANGE[0], jitter.RANGE[1], size, size), T.FixedSizeCrop((size, size), pad=False)]


def _color_jitter(cfg) -> List[T.Augmentation]:
    jitter = cfg.INPUT.COLOR_JITTER
    augs: List[T.Augmentation] = []
    if jitter.BRIGHTNESS > 0:
        augs.append(T.RandomBrightness(1 - jitter.BRIGHTNESS, 1 + jitter.BRIGHTNESS))
    if jitter.CONTRAST > 0:
        augs.append(T.RandomContrast(1 - jitter.CONTRAST, 1 + jitter.CONTRAST))
    if jitter.SATURATION > 0:
        augs.append(FormatAwareSaturation(1 - jitter.SATURATION, 1 + jitter.SATURATION, cfg.INPUT.FORMAT))
    return augs


def detectron2_view(cfg):
    """``cfg`` as detectron2's builders can read it: with ``INPUT.RANDOM_FLIP "both"`` a copy
    that says "horizontal" (detectron2 knows one direction), else ``cfg`` itself."""
    if cfg.INPUT.RANDOM_FLIP != "both":
        return cfg
    view = cfg.clone()
    view.defrost()
    view.INPUT.RANDOM_FLIP = "horizontal"
    return view


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """The training augmentations of ``cfg`` (module docstring), in order: crop and resize
    (or the scale jitter), flips, colour jitter."""
    _check(cfg)
    augs = utils.build_augmentation(detectron2_view(cfg), is_train=True)
    if cfg.INPUT.SCALE_JITTER.ENABLED:  # replaces detectron2's resize, the first of the list
        augs = _scale_jitter(cfg) + augs[1:]
    if cfg.INPUT.CROP.ENABLED:  # where DatasetMapper.from_config puts it
        augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP == "both":
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    return augs + _color_jitter(cfg)
