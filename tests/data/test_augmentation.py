"""retina_focal/data/augmentation.py: detectron2's training augmentations by default, plus
INPUT.RANDOM_FLIP "both" and INPUT.COLOR_JITTER, each checked by its effect on an image."""
import numpy as np
import pytest
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from retina_focal.data.augmentation import FormatAwareSaturation, build_train_augmentation
from retina_focal.data.mapper import build_train_mapper
from tests.conftest import small_cfg

BOX = np.array([[10.0, 10.0, 30.0, 50.0]])  # XYXY in a 100 x 80 (w x h) image


def _describe(augs):
    return [(type(a).__name__, sorted((k, str(v)) for k, v in vars(a).items())) for a in augs]


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["INPUT.RANDOM_FLIP", "vertical", "INPUT.MIN_SIZE_TRAIN", (96, 128), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range"],
        ["INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE", "relative_range", "INPUT.CROP.SIZE", [0.5, 0.5]],
    ],
)
def test_with_the_new_keys_off_the_list_is_detectron2s(opts):
    cfg = small_cfg(*opts)
    ours = build_train_augmentation(cfg)
    assert _describe(ours) == _describe(DatasetMapper(cfg, is_train=True).augmentations.augs)
    assert _describe(build_train_mapper(cfg).augmentations.augs) == _describe(ours)


def _boxes_after(augs, seed, image=None):
    np.random.seed(seed)
    image = np.zeros((80, 100, 3), np.uint8) if image is None else image
    inputs = T.AugInput(image, boxes=BOX.copy())
    T.AugmentationList(augs)(inputs)
    return inputs.boxes[0], inputs.image


def test_both_flips_flip_each_way_independently():
    cfg = small_cfg("INPUT.RANDOM_FLIP", "both", "INPUT.MIN_SIZE_TRAIN", (80,), "INPUT.MAX_SIZE_TRAIN", 100)
    cfg.freeze()  # as the trainer's
    augs = build_train_augmentation(cfg)
    assert cfg.INPUT.RANDOM_FLIP == "both"
    seen = set()
    for seed in range(40):
        box, _ = _boxes_after(augs, seed)
        horizontal = not np.allclose(box[[0, 2]], BOX[0, [0, 2]])
        vertical = not np.allclose(box[[1, 3]], BOX[0, [1, 3]])
        if horizontal:
            assert np.allclose(box[[0, 2]], [70.0, 90.0])  # mirrored in the 100-px width
        if vertical:
            assert np.allclose(box[[1, 3]], [30.0, 70.0])  # mirrored in the 80-px height
        seen.add((horizontal, vertical))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_colour_jitter_changes_pixels_within_its_range_and_never_the_boxes():
    image = np.full((80, 100, 3), 100, np.uint8)
    image[:, :50] = (40, 120, 200)
    base = small_cfg("INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", (80,), "INPUT.MAX_SIZE_TRAIN", 100)
    unchanged = _boxes_after(build_train_augmentation(base), 0, image.copy())[1]
    assert np.array_equal(unchanged, image)
    for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        cfg = base.clone()
        cfg.INPUT.COLOR_JITTER[key] = 0.4
        augs = build_train_augmentation(cfg)
        assert len(augs) == 2
        ratios = []
        for seed in range(10):
            box, out = _boxes_after(augs, seed, image.copy())
            assert np.array_equal(box, BOX[0])
            ratios.append(out.astype(float).std() / image.astype(float).std())
        assert max(ratios) - min(ratios) > 0.1, key  # the factor varies between images
        if key == "BRIGHTNESS":  # the plain grey half scales by the factor, within [0.6, 1.4]
            grey = [_boxes_after(augs, s, image.copy())[1][0, 99, 0] / 100 for s in range(10)]
            assert 0.6 - 0.01 <= min(grey) and max(grey) <= 1.4 + 0.01


def test_saturation_blends_towards_the_grey_of_the_channel_order():
    pixel = np.array([[[200.0, 50.0, 10.0]]])  # one strongly coloured pixel
    rgb, bgr = FormatAwareSaturation(0, 0, "RGB"), FormatAwareSaturation(0, 0, "BGR")  # factor 0: all grey
    grey_rgb = rgb.get_transform(pixel).apply_image(pixel.copy())[0, 0]
    grey_bgr = bgr.get_transform(pixel[..., ::-1].copy()).apply_image(pixel[..., ::-1].copy())[0, 0]
    expected = 0.299 * 200 + 0.587 * 50 + 0.114 * 10
    assert np.allclose(grey_rgb, expected) and np.allclose(grey_bgr, expected)  # the same picture, either order


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.RANDOM_FLIP", "diagonal"], "INPUT.RANDOM_FLIP must be one of"),
        (["INPUT.COLOR_JITTER.CONTRAST", 1.5], "INPUT.COLOR_JITTER.CONTRAST must be in"),
        (["INPUT.COLOR_JITTER.SATURATION", 0.2, "INPUT.FORMAT", "L"], "INPUT.FORMAT is 'L'"),
        (["INPUT.SCALE_JITTER.ENABLED", True, "INPUT.SCALE_JITTER.RANGE", (1.5, 0.5)], r"INPUT.SCALE_JITTER.RANGE must be \(min, max\)"),
    ],
)
def test_bad_values_are_errors_naming_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        build_train_augmentation(small_cfg(*opts))


def test_the_training_mapper_of_a_both_flip_config_flips_both_ways():
    cfg = small_cfg("INPUT.RANDOM_FLIP", "both")
    cfg.freeze()
    names = [type(a).__name__ for a in build_train_mapper(cfg).augmentations.augs]
    flips = [a for a in build_train_mapper(cfg).augmentations.augs if isinstance(a, T.RandomFlip)]
    assert names[0] == "ResizeShortestEdge" and [(f.horizontal, f.vertical) for f in flips] == [(True, False), (False, True)]


def test_scale_jitter_scales_within_its_range_and_crops_at_most_its_size():
    cfg = small_cfg("INPUT.SCALE_JITTER.ENABLED", True, "INPUT.SCALE_JITTER.RANGE", (0.5, 2.0), "INPUT.SCALE_JITTER.SIZE", 64,
                    "INPUT.RANDOM_FLIP", "none")
    augs = build_train_augmentation(cfg)
    assert [type(a).__name__ for a in augs] == ["ResizeScale", "FixedSizeCrop"]
    shapes, widths = set(), []
    for seed in range(30):
        box, out = _boxes_after(augs, seed, np.zeros((80, 100, 3), np.uint8))
        shapes.add(out.shape[:2])
        assert out.shape[0] <= 64 and out.shape[1] <= 64
        widths.append(out.shape[1])
    # scale s: the 100 x 80 image fits 64s x 64s, i.e. becomes 64s wide; cropped to 64 when s > 1
    assert min(widths) < 40 and max(widths) == 64 and len(shapes) > 5


def test_scale_jitter_and_crop_together_are_an_error():
    with pytest.raises(ValueError, match="INPUT.SCALE_JITTER.ENABLED and INPUT.CROP.ENABLED"):
        build_train_augmentation(small_cfg("INPUT.SCALE_JITTER.ENABLED", True, "INPUT.CROP.ENABLED", True))
