import hashlib
import json
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from retina_focal.data import IMBALANCE_LEVELS, SHAPE_CLASSES, register_builtin_shapes, register_imbalance_level, register_shapes
from retina_focal.data.shapes import ShapesSplit, generate_split


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_same_seed_same_files(tmp_path):
    spec = ShapesSplit("val", num_images=12)
    _, a = generate_split(spec, str(tmp_path / "a"))
    _, b = generate_split(spec, str(tmp_path / "b"))
    assert _digest(a) == _digest(b)
    _, c = generate_split(ShapesSplit("val", num_images=12, seed=1), str(tmp_path / "a"))
    assert _digest(a) != _digest(c)


def test_annotations_are_valid_coco(tmp_path):
    spec = ShapesSplit("train", num_images=60, image_size=96)
    json_file, _ = generate_split(spec, str(tmp_path))
    coco = COCO(json_file)
    assert len(coco.getImgIds()) == 60
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    boxes = np.array([a["bbox"] for a in anns])  # XYWH
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 96).all() and (boxes[:, 1] + boxes[:, 3] <= 96).all()
    sides = np.sqrt(boxes[:, 2] * boxes[:, 3])  # geometric mean side: min_size up to 0.8 x image
    assert (sides >= spec.min_size - 1).all() and (sides <= 0.8 * 96 + 1).all()
    assert {a["category_id"] for a in anns} <= set(range(1, len(SHAPE_CLASSES) + 1))
    # several FPN levels get work: sides from under 16 px to over half the image
    assert sides.min() < 16 and sides.max() > 48
    per_image = {i: 0 for i in coco.getImgIds()}
    for a in anns:
        per_image[a["image_id"]] += 1
    assert min(per_image.values()) == 0  # some images have no object


def test_register_twice_is_harmless_and_loads(tmp_path):
    names = register_shapes(str(tmp_path), num_train=6, num_val=4, prefix="shapes_test")
    register_shapes(str(tmp_path), num_train=6, num_val=4, prefix="shapes_test")
    assert names == ["shapes_test_train", "shapes_test_val"]
    dicts = DatasetCatalog.get("shapes_test_val")
    assert len(dicts) == 4 and os.path.exists(dicts[0]["file_name"])
    meta = MetadataCatalog.get("shapes_test_val")
    assert meta.thing_classes == list(SHAPE_CLASSES) and os.path.exists(meta.json_file)
    with open(meta.json_file) as f:
        assert len(json.load(f)["images"]) == 4


def test_added_empty_images_follow_the_same_images_pixel_for_pixel(tmp_path):
    """An imbalance level: the base split unchanged, then images of background and clutter only."""
    base_json, base = generate_split(ShapesSplit("train", num_images=5), str(tmp_path))
    level_json, level = generate_split(ShapesSplit("train", num_images=5, num_added_empty=4), str(tmp_path))
    assert base != level
    for i in range(5):
        name = f"{i:06d}.png"
        assert open(os.path.join(base, name), "rb").read() == open(os.path.join(level, name), "rb").read()
    base_coco, level_coco = COCO(base_json), COCO(level_json)
    assert len(level_coco.getImgIds()) == 9
    assert level_coco.dataset["annotations"] == base_coco.dataset["annotations"]  # none on images 6-9
    added = [cv2.imread(os.path.join(level, f"{i:06d}.png")) for i in range(5, 9)]
    assert all(img.shape == (128, 128, 3) and img.std() > 5 for img in added)  # textured, not blank
    assert len({img.tobytes() for img in added}) == 4


def test_imbalance_levels_register_lazily_with_the_demo_validation_set(tmp_path):
    try:
        _check_imbalance_levels(str(tmp_path))
    finally:
        register_builtin_shapes()  # the names again under the default root, for later tests


def _check_imbalance_levels(root):
    names = [register_imbalance_level(level, root) for level in IMBALANCE_LEVELS]
    assert names == [f"retina_focal_shapes_{lv}_train" for lv in ("x1", "x4", "x10", "x22")]
    folders = {MetadataCatalog.get(n).image_root for n in names}
    assert len(folders) == 4 and not any(os.path.exists(f) for f in folders)  # nothing written yet
    demo = os.path.join(root, "retina_focal_shapes", ShapesSplit("train", 2000).folder_name())
    assert MetadataCatalog.get("retina_focal_shapes_x1_train").image_root == demo  # x1 is the demo's set
    assert MetadataCatalog.get(names[-1]).thing_classes == list(SHAPE_CLASSES)
