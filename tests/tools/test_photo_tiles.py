"""tools/photo_tiles.py: tiles that never share a pixel between splits, boxes cut by a tile's
edge kept or made crowd regions by the visible share, small regions as crowd regions."""
import importlib.util
import json

import numpy as np
import pytest

from tools import photo_tiles


def test_train_and_val_tiles_share_no_pixel():
    positions = photo_tiles.tile_positions(30, seed=0, height=872, width=1000)
    assert len(positions["train"]) == 30 and len(positions["val"]) == 4
    assert max(x for x, _ in positions["train"]) + photo_tiles.TILE <= photo_tiles.TRAIN_COLUMNS
    assert min(x for x, _ in positions["val"]) >= photo_tiles.TRAIN_COLUMNS
    assert all(0 <= y <= 872 - photo_tiles.TILE for _, y in positions["train"] + positions["val"])


def test_annotations_of_a_tile():
    boxes = np.array([
        [10, 10, 30, 40],     # inside: an object
        [100, 100, 105, 104],  # 5 px: a crowd region
        [390, 50, 420, 70],   # 10 of 30 px visible: a crowd region
        [380, 50, 410, 70],   # 20 of 30 px visible: an object, clipped
        [500, 500, 520, 520],  # outside: nothing
    ], dtype=float)
    anns = photo_tiles.tile_annotations(boxes, 0, 0, 400)
    assert [(a["bbox"], a["iscrowd"]) for a in anns] == [
        ([10.0, 10.0, 20.0, 30.0], 0), ([100.0, 100.0, 5.0, 4.0], 1), ([390.0, 50.0, 10.0, 20.0], 1), ([380.0, 50.0, 20.0, 20.0], 0)]
    shifted = photo_tiles.tile_annotations(boxes, 5, 5, 400)
    assert shifted[0]["bbox"] == [5.0, 5.0, 20.0, 30.0]


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image (pip install scikit-image)")
def test_build_writes_coco_files_of_the_hubble_tiles(tmp_path):
    specs = photo_tiles.build(str(tmp_path), num_train=3)
    assert specs["train"] == f"coco:{tmp_path / 'train.json'}:{tmp_path / 'images'}"
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train["images"]) == 3 and train["categories"] == [{"id": 1, "name": "object"}]
    objects = [a for a in train["annotations"] if not a["iscrowd"]]
    assert len(objects) > 10  # galaxies and stars in every 400-px tile
    assert all(0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= photo_tiles.TILE for a in train["annotations"])
