import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

from retina_focal.modeling.anchors import RetinaFocalAnchorGenerator, sub_octave_sizes
from tests.conftest import small_cfg

STRIDES = [8, 16, 32, 64, 128]
BASES = [32, 64, 128, 256, 512]


def _features(grid_sizes):
    return [torch.zeros(2, 1, h, w) for h, w in grid_sizes]


@pytest.mark.parametrize(
    "sizes, ratios",
    [
        (sub_octave_sizes(BASES, 3), [[0.5, 1.0, 2.0]]),  # §4 default, A = 9
        (sub_octave_sizes(BASES, 1), [[1.0]]),  # Table 1c first row: one square anchor
        (sub_octave_sizes(BASES, 4), [[0.5, 1.0, 2.0]]),  # Table 1c last row: A = 12
        ([[16, 24]], [[0.25, 1.0, 4.0]]),  # one list shared by all levels
        ([[s] for s in BASES], [[0.5, 2.0]] * 5),  # one list per level
    ],
)
@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_same_anchors_as_detectron2(sizes, ratios, offset):
    kwargs = dict(sizes=sizes, aspect_ratios=ratios, strides=STRIDES, offset=offset)
    ours, theirs = RetinaFocalAnchorGenerator(**kwargs), DefaultAnchorGenerator(**kwargs)
    grids = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    expected = theirs(_features(grids))
    for _ in range(2):  # computed, then served from the cache
        for a, b in zip(ours(_features(grids)), expected):
            assert torch.equal(a.tensor, b.tensor)
    assert ours.num_cell_anchors == [len(sizes[0]) * len(ratios[0])] * 5


def test_default_config_sizes_are_the_papers():
    # Base-RetinaFocal.yaml writes the sizes as a Python expression; they must be 2^(k/3)·base
    sizes = small_cfg().MODEL.ANCHOR_GENERATOR.SIZES
    for ours, expected in zip(sizes, sub_octave_sizes(BASES, 3)):
        assert ours == pytest.approx(expected)
    # §4: "across levels they cover the scale range 32 - 813 pixels"
    assert min(min(s) for s in sizes) == 32
    assert math.isclose(max(max(s) for s in sizes), 812.7, abs_tol=0.1)


def test_exact_coordinates_on_a_1x2_grid():
    gen = RetinaFocalAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[8])
    (anchors,) = gen([torch.zeros(1, 1, 1, 2)])
    # centres at half a stride: (4, 4) and (12, 4); side 32
    assert anchors.tensor.tolist() == [[-12.0, -12.0, 20.0, 20.0], [-4.0, -12.0, 28.0, 20.0]]


def test_nine_anchors_per_location_with_the_papers_areas_and_ratios():
    gen = RetinaFocalAnchorGenerator(sizes=sub_octave_sizes(BASES, 3), aspect_ratios=[[0.5, 1.0, 2.0]], strides=STRIDES)
    (p3, *_rest) = gen(_features([(1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]))
    w = p3.tensor[:, 2] - p3.tensor[:, 0]
    h = p3.tensor[:, 3] - p3.tensor[:, 1]
    assert len(p3) == 9
    areas = (w * h).view(3, 3)  # sizes x ratios: area fixed per size
    expected = torch.tensor([32.0 * 2 ** (k / 3) for k in range(3)]) ** 2
    torch.testing.assert_close(areas, expected[:, None].expand(3, 3), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close((h / w).view(3, 3), torch.tensor([[0.5, 1.0, 2.0]] * 3), rtol=1e-5, atol=1e-5)


def test_cache_is_keyed_by_grid_size_and_dropped_on_module_moves():
    gen = RetinaFocalAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[8])
    first = gen([torch.zeros(1, 1, 2, 2)])[0].tensor
    assert gen([torch.zeros(3, 1, 2, 2)])[0].tensor is first  # same grid: reused
    assert gen([torch.zeros(1, 1, 3, 2)])[0].tensor.shape == (6, 4)  # new grid: computed
    gen.to(torch.float32)  # .to()/.cuda()/.half() rebuild from the moved buffers
    again = gen([torch.zeros(1, 1, 2, 2)])[0].tensor
    assert again is not first and torch.equal(again, first)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(sizes=[[32], [64]], aspect_ratios=[[1.0]]), "SIZES"),  # 2 lists for 5 levels
        (dict(sizes=[[32, -4]], aspect_ratios=[[1.0]]), "SIZES"),
        (dict(sizes=[[32]], aspect_ratios=[[0.0, 1.0]]), "ASPECT_RATIOS"),
        (dict(sizes=[[32]] * 4 + [[32, 40]], aspect_ratios=[[1.0]]), "same number of anchors"),
    ],
)
def test_bad_anchor_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RetinaFocalAnchorGenerator(strides=STRIDES, **kwargs)


def test_from_config_uses_feature_strides():
    shapes = [ShapeSpec(channels=64, stride=s) for s in STRIDES]
    gen = RetinaFocalAnchorGenerator(small_cfg(), shapes)
    assert gen.strides == STRIDES and gen.num_cell_anchors == [9] * 5
