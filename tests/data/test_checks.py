"""Bad annotations fail before training and name the image; odd images still train."""
import logging
import math
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from retina_focal.data import check_dataset_dicts, check_num_classes
from retina_focal.modeling.input_checks import check_gt_instances
from retina_focal.data.checks import UnusableImageError, drop_unusable_images, read_usable_image
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import make_instances, small_cfg


def _record(bbox, category_id=0, bbox_mode=BoxMode.XYXY_ABS, image_id=7, **ann):
    return {
        "image_id": image_id,
        "file_name": f"img_{image_id}.png",
        "height": 64,
        "width": 64,
        "annotations": [{"bbox": bbox, "bbox_mode": bbox_mode, "category_id": category_id, **ann}],
    }


@pytest.mark.parametrize(
    "record, message",
    [
        (_record([1, 1, 9, 9], category_id=3), r"image_id=7 \(img_7.png\) annotation 0: category_id 3 is not in \[0, 3\)"),
        (_record([1, 1, 9, 9], category_id=-1), "category_id -1"),
        (_record([1, float("nan"), 9, 9]), r"bbox \[1, nan, 9, 9\] is not finite"),
        (_record([1, 1, float("inf"), 9]), "is not finite"),
        (_record([9, 1, 1, 9]), r"x2 < x1"),
        (_record([1, 1, -3, 5], bbox_mode=BoxMode.XYWH_ABS), r"XYWH_ABS\) has x2 < x1"),
    ],
)
def test_invalid_annotation_names_image_annotation_and_value(record, message):
    good = _record([0, 0, 5, 5], image_id=1)
    with pytest.raises(ValueError, match=message):
        check_dataset_dicts([good, record], num_classes=3, dataset_names=["toy"])


def test_many_problems_are_counted_and_the_first_listed():
    records = [_record([1, 1, 9, 9], category_id=9, image_id=i) for i in range(8)]
    with pytest.raises(ValueError, match=r"(?s)8 invalid annotation\(s\).*\.\.\. and 3 more"):
        check_dataset_dicts(records, num_classes=3)


def test_crowd_and_zero_area_boxes_pass_and_zero_area_is_counted(caplog):
    records = [_record([5, 5, 5, 9]), _record([1, 1, 9, 9], category_id=99, iscrowd=1), _record([0, 0, 0, 0])]
    with caplog.at_level(logging.WARNING, logger="retina_focal.data.checks"):
        check_dataset_dicts(records, num_classes=3)
    assert "2 box(es) of zero width or height" in caplog.text


def test_num_classes_must_match_dataset_metadata():
    MetadataCatalog.get("retina_focal_test_two_classes").thing_classes = ["a", "b"]
    with pytest.raises(ValueError, match=r"NUM_CLASSES=3 but dataset 'retina_focal_test_two_classes' has 2 classes"):
        check_num_classes(3, ["retina_focal_test_two_classes"])
    check_num_classes(2, ["retina_focal_test_two_classes"])


@pytest.mark.parametrize(
    "box, cls, message",
    [([1, 1, 9, 9], 3, "class 3"), ([1, 1, float("nan"), 9], 0, "nan"), ([9, 1, 1, 9], 0, r"\[9.0, 1.0, 1.0, 9.0\]")],
)
def test_batch_check_names_the_image_for_custom_loaders(box, cls, message):
    instances = [make_instances([[0, 0, 4, 4]], [0]), make_instances([[0, 0, 4, 4], box], [1, cls])]
    inputs = [{"image_id": 1, "file_name": "a.png"}, {"image_id": 2, "file_name": "b.png"}]
    with pytest.raises(ValueError, match=rf"image_id=2 \(b.png\), instance 1: .*{message}"):
        check_gt_instances(instances, 3, inputs)


def _training_loss(model, height, width, boxes, classes):
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8)
    batch = [{"image": image, "instances": make_instances(boxes, classes, (height, width)), "image_id": 0}]
    with EventStorage():
        losses = model(batch)
    return {k: float(v.detach()) for k, v in losses.items()}


@pytest.mark.parametrize(
    "height, width, boxes, classes",
    [
        (20, 20, [[2, 3, 15, 18]], [1]),  # smaller than the largest stride (128)
        (16, 1024, [[10, 2, 900, 14]], [0]),  # 1:64 aspect ratio
        (1024, 24, [[1, 100, 20, 800]], [2]),
        (64, 64, [], []),  # no objects: every anchor is background
    ],
)
def test_tiny_extreme_and_empty_images_train_and_predict(height, width, boxes, classes):
    model = RetinaFocalTrainer.build_model(small_cfg())
    losses = _training_loss(model, height, width, boxes, classes)
    assert all(math.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, height, width, dtype=torch.uint8)}])[0]["instances"]
    assert out.image_size == (height, width)
    assert torch.isfinite(out.pred_boxes.tensor).all()


def test_zero_area_box_is_dropped_not_matched_to_every_anchor(caplog):
    model = RetinaFocalTrainer.build_model(small_cfg())
    batch = [{"image": torch.zeros(3, 128, 128), "image_id": 3,
              "instances": make_instances([[10, 10, 10, 40], [20, 20, 60, 60]], [0, 1])}]
    assignment = model.labelled_predictions(batch)[3]
    assert 0 < int(assignment.foreground.sum()) < 50
    assert not (assignment.labels == 0).any()  # the zero-width box of class 0 got no anchor


def _image_set(folder):
    """Dataset dicts of: a good PNG, truncated JPEG and PNG, a text file named .png, a
    1 x 2000 px PNG, a missing file. Returns (dicts, the good file)."""
    import cv2
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for name, shape in (("good.png", (32, 32, 3)), ("cut.jpg", (32, 32, 3)), ("cut.png", (32, 32, 3)), ("thin.png", (1, 2000, 3))):
        files[name] = os.path.join(folder, name)
        cv2.imwrite(files[name], rng.integers(0, 256, shape, dtype=np.uint8))
    for name in ("cut.jpg", "cut.png"):
        data = open(files[name], "rb").read()
        open(files[name], "wb").write(data[: len(data) // 2])
    files["text.png"] = os.path.join(folder, "text.png")
    open(files["text.png"], "w").write("not an image")
    files["missing.png"] = os.path.join(folder, "missing.png")
    dicts = [{"file_name": path, "image_id": i, "annotations": []} for i, path in enumerate(files.values())]
    return dicts, files["good.png"]


@pytest.mark.parametrize(
    "mode, truncated_jpeg",
    [("quick", "truncated: no JPEG end-of-image marker"), ("full", "cannot be decoded (OSError: image file is truncated")],
)
def test_unusable_images_are_left_out_each_named_with_its_reason(tmp_path, caplog, mode, truncated_jpeg):
    dicts, good = _image_set(str(tmp_path))
    with caplog.at_level("WARNING", logger="retina_focal.data.checks"):
        kept = drop_unusable_images(dicts, ["mine"], mode, 128, 128, "INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN")
    assert [d["file_name"] for d in kept] == [good]
    text = caplog.text
    assert "Left out 5 of the 6 images of ['mine'] that cannot be used:" in text
    assert f"{tmp_path}/cut.jpg: {truncated_jpeg}" in text
    assert f"{tmp_path}/thin.png: 2000x1 px: resized to a short side of 128 px" in text
    assert f"{tmp_path}/text.png: cannot be decoded (UnidentifiedImageError" in text
    assert f"{tmp_path}/missing.png: no such file" in text


def test_image_check_off_and_bad_mode(tmp_path):
    dicts, _ = _image_set(str(tmp_path))
    assert drop_unusable_images(dicts, ["mine"], "none", 128, 128, "K") is dicts
    with pytest.raises(ValueError, match=r"DATALOADER.CHECK_IMAGES must be one of \['quick', 'full', 'none'\], got 'yes'"):
        drop_unusable_images(dicts, ["mine"], "yes", 128, 128, "K")


def test_training_loader_leaves_unusable_images_out(tmp_path):
    dicts, good = _image_set(str(tmp_path))
    for d in dicts:
        d.update(height=32, width=32)
    name = "checks_unusable_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    cfg = small_cfg("DATASETS.TRAIN", (name,), "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False,
                    "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128, "SOLVER.IMS_PER_BATCH", 1)
    loader = RetinaFocalTrainer.build_train_loader(cfg)
    assert [d["file_name"] for d in loader.dataset.dicts] == [good]


def _sixteen_bit_png(path):
    import cv2
    import numpy as np

    cv2.imwrite(str(path), (np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40))  # values up to 61,400
    return str(path)


def _rotated_jpeg(path, width=48, height=32):
    """A JPEG stored width x height with EXIF orientation 6: read (as detectron2 does) height x width turned."""
    from PIL import Image

    exif = Image.Exif()
    exif[274] = 6
    Image.new("RGB", (width, height), (90, 120, 150)).save(str(path), exif=exif)
    return str(path)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_a_16_bit_image_is_left_out_by_name_not_read_as_white(tmp_path, caplog, mode):
    """detectron2's read_image clips a 16-bit PNG to 8-bit RGB: every pixel above 255 turns white."""
    from detectron2.data.detection_utils import read_image

    path = _sixteen_bit_png(tmp_path / "deep.png")
    assert (read_image(path, format="BGR") == 255).mean() > 0.9  # why it is refused
    dicts = [{"file_name": path, "image_id": 0, "height": 32, "width": 48, "annotations": []}]
    with caplog.at_level("WARNING", logger="retina_focal.data.checks"):
        assert drop_unusable_images(dicts, ["mine"], mode, 32, 64, "K") == []
    assert f"{path}: a high-bit-depth image (PIL mode I;16)" in caplog.text
    with pytest.raises(UnusableImageError, match=r"high-bit-depth image \(PIL mode I;16\).*convert it to 8 bits"):
        read_usable_image(path)  # retina-focal-predict skips it with this reason


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_a_recorded_size_that_is_not_the_files_is_found_before_training(tmp_path, caplog, mode):
    """An EXIF-rotated JPEG recorded with its stored size, or a VOC <size> that is wrong, used to
    stop training with detectron2's SizeMismatchError whenever the stream reached it."""
    rotated = _rotated_jpeg(tmp_path / "rotated.jpg")
    good = _rotated_jpeg(tmp_path / "good.jpg")
    dicts = [
        {"file_name": rotated, "image_id": 0, "height": 32, "width": 48, "annotations": []},  # stored size: wrong
        {"file_name": good, "image_id": 1, "height": 48, "width": 32, "annotations": []},  # as read: right
    ]
    with caplog.at_level("WARNING", logger="retina_focal.data.checks"):
        kept = drop_unusable_images(dicts, ["mine"], mode, 32, 64, "K")
    assert [d["file_name"] for d in kept] == [good]
    assert f"{rotated}: its annotations say 48x32 px, the file is 32x48 px (EXIF orientation applied)" in caplog.text


def test_the_csv_reader_records_the_size_detectron2_reads(tmp_path):
    from retina_focal.data.formats import load_csv

    _rotated_jpeg(tmp_path / "rotated.jpg")
    (tmp_path / "ann.csv").write_text("rotated.jpg,1,2,20,30,dog\n")
    (dicts,), _ = load_csv(str(tmp_path / "ann.csv"))
    assert (dicts["height"], dicts["width"]) == (48, 32)
