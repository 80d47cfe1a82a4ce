"""retina_focal/data/formats.py: COCO, VOC and CSV datasets named on the command line, their
errors (naming the file and the line or object), and the same dataset in all three formats."""
import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from retina_focal.data import (
    DatasetSpec,
    check_same_classes,
    coco_json_for_evaluation,
    dataset_folder_name,
    register_dataset,
    resolve_num_classes,
)
from retina_focal.data.formats import load_csv, load_voc
from retina_focal.config.load import load_config
from tests.conftest import REPO, small_cfg
from tools.shapes_formats import export


def _image(path, h=40, w=60):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, dtype=np.uint8))
    return str(path)


def _rows(name):
    """(height, width, [(XYXY box, class)]) of each image of a registered dataset."""
    return [
        (r["height"], r["width"], [
            (tuple(BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)), a["category_id"], a.get("iscrowd", 0))
            for a in r["annotations"]
        ])
        for r in DatasetCatalog.get(name)
    ]


@pytest.fixture(scope="module")
def shapes_specs(tmp_path_factory):
    return export(str(tmp_path_factory.mktemp("shapes_formats")), tiny=True)


def test_the_same_dataset_in_three_formats_loads_to_the_same_dicts(shapes_specs):
    for split, specs in shapes_specs.items():
        for spec in specs.values():
            assert register_dataset(spec)
        rows = [_rows(spec) for spec in specs.values()]
        assert rows[0] == rows[1] == rows[2] and len(rows[0]) == (48 if split == "train" else 16)
        classes = [MetadataCatalog.get(spec).thing_classes for spec in specs.values()]
        assert classes[0] == classes[1] == classes[2] == ["circle", "square", "triangle", "cross", "ring"]


def test_spec_syntax_and_safe_folder_names():
    assert DatasetSpec.parse("coco_2017_train") is None
    assert DatasetSpec.parse("coco:a/b.json:imgs") == DatasetSpec("coco", "a/b.json", "imgs")
    assert DatasetSpec.parse("voc:/data/VOC2007") == DatasetSpec("voc", "/data/VOC2007", None)
    with pytest.raises(ValueError, match="names no file"):
        DatasetSpec.parse("csv:")
    folder = dataset_folder_name("csv:/data/x/train.csv:/data/x/classes.csv")
    assert "/" not in folder and ":" not in folder and folder != dataset_folder_name("csv:/data/y/train.csv")
    assert dataset_folder_name("coco_2017_val") == "coco_2017_val"
    with pytest.raises(FileNotFoundError, match="no such file or folder /nope.json"):
        register_dataset("coco:/nope.json")


def _csv(tmp_path, lines, classes=None):
    path = tmp_path / "ann.csv"
    path.write_text("\n".join(lines) + "\n")
    if classes is not None:
        (tmp_path / "classes.csv").write_text("\n".join(f"{n},{i}" for i, n in enumerate(classes)) + "\n")
    return str(path), (str(tmp_path / "classes.csv") if classes is not None else None)


def test_csv_rows_empty_images_relative_paths_classes_and_clipping(tmp_path, caplog):
    _image(tmp_path / "img" / "a.png"), _image(tmp_path / "img" / "b.png")
    csv_file, classes_file = _csv(tmp_path, [
        "img/a.png,1,2,30,20,dog", "img/a.png,10,10,70,45,cat",  # the second reaches outside (60x40): clipped
        "img/b.png,,,,,", "img/a.png,0,0,5,5,crowd",
    ])
    with caplog.at_level("WARNING", logger="retina_focal.data.formats"):
        dicts, classes = load_csv(csv_file, ignore_class="crowd")
    assert classes == ["cat", "dog"]  # found, sorted (the ignore class is not a class)
    assert [d["file_name"] for d in dicts] == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert [(a["bbox"], a["category_id"], a["iscrowd"]) for a in dicts[0]["annotations"]] == [
        ([1, 2, 30, 20], 1, 0), ([10, 10, 60, 40], 0, 0), ([0, 0, 5, 5], 0, 1)
    ]
    assert dicts[1]["annotations"] == [] and (dicts[0]["height"], dicts[0]["width"]) == (40, 60)
    assert f"{csv_file}: 1 box(es) reached outside their image and were clipped to it" in caplog.text
    dicts, classes = load_csv(*_csv(tmp_path, ["img/a.png,1,2,30,20,dog"], classes=["dog", "cat"]))
    assert classes == ["dog", "cat"] and dicts[0]["annotations"][0]["category_id"] == 0


@pytest.mark.parametrize(
    "line, classes, message",
    [
        ("img/a.png,1,2,30", None, "line 2: expected 6 fields path,x1,y1,x2,y2,class_name, got 4"),
        ("img/a.png,1,two,30,20,dog", None, "line 2: y1 'two' is not a number"),
        ("img/a.png,30,2,30,20,dog", None, r"line 2: box \[30, 2, 30, 20\] has x2 <= x1 or y2 <= y1"),
        ("img/a.png,1,2,30,20,cow", ["dog"], "line 2: class 'cow' is not in"),
        ("img/missing.png,1,2,30,20,dog", None, r"line 2: image .*missing.png: no such file"),
        ("notes.txt,1,2,30,20,dog", None, r"line 2: image .*notes.txt cannot be read \(UnidentifiedImageError"),
        ("img/a.png,1,2,30,20,", None, r"line 2: box \['1', '2', '30', '20'\] has no class name \(the 6th field is empty\)"),
        ("img/a.png,1,2,30,20,", ["dog"], r"line 2: box \['1', '2', '30', '20'\] has no class name"),
    ],
)
def test_csv_errors_name_the_file_and_line(tmp_path, line, classes, message):
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    csv_file, classes_file = _csv(tmp_path, ["img/a.png,1,2,30,20,dog", line], classes=classes)
    with pytest.raises(ValueError, match=f"{csv_file} {message}"):
        load_csv(csv_file, classes_file)


def _voc(tmp_path, objects, size="<size><width>60</width><height>40</height></size>", name="a"):
    root = tmp_path / "VOC"
    _image(root / "JPEGImages" / f"{name}.jpg")
    xml = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{name}.xml").write_text(f"<annotation><filename>{name}.jpg</filename>{size}{xml}</annotation>")
    return str(root)


def test_voc_classes_one_based_boxes_difficult_and_splits(tmp_path):
    root = _voc(tmp_path, [("zebra", (1, 1, 30, 20), 0), ("ant", (11, 11, 50, 40), 1)])
    dicts, classes = load_voc(root)
    assert classes == ["ant", "zebra"]  # found, sorted
    assert [(a["bbox"], a["category_id"], a["iscrowd"]) for a in dicts[0]["annotations"]] == [
        ([0.0, 0.0, 30.0, 20.0], 1, 0), ([10.0, 10.0, 50.0, 40.0], 0, 0)
    ]
    dicts, _ = load_voc(root, difficult_as_crowd=True)
    assert [a["iscrowd"] for a in dicts[0]["annotations"]] == [0, 1]
    (tmp_path / "VOC" / "classes.txt").write_text("zebra\nant\n")
    assert load_voc(root)[1] == ["zebra", "ant"]  # classes.txt gives the order
    (tmp_path / "VOC" / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "VOC" / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    assert len(load_voc(root, "train")[0]) == 1
    with pytest.raises(ValueError, match=r"VOC split 'val': no such file .*val.txt"):
        load_voc(root, "val")


@pytest.mark.parametrize(
    "objects, size, message",
    [
        ([("cat", (1, 1, 30, 20), 0)], "", r"a.xml: no <size> with <width> and <height>"),
        ([("cat", (1, 1, 30, 20), 0), ("cat", (40, 5, 30, 20), 0)], None, r"a.xml object 1: box \[39, 4, 30, 20\] has x2 <= x1"),
    ],
)
def test_voc_errors_name_the_xml_and_object(tmp_path, objects, size, message):
    root = _voc(tmp_path, objects, **({} if size is None else {"size": size}))
    with pytest.raises(ValueError, match=message):
        load_voc(root)


def test_voc_missing_image_and_unknown_class(tmp_path):
    root = _voc(tmp_path, [("cat", (1, 1, 30, 20), 0)])
    (tmp_path / "VOC" / "classes.txt").write_text("dog\n")
    with pytest.raises(ValueError, match=r"a.xml object 0: class 'cat' is not in .*classes.txt \(\['dog'\]\)"):
        load_voc(root)
    os.remove(tmp_path / "VOC" / "classes.txt")
    os.remove(tmp_path / "VOC" / "JPEGImages" / "a.jpg")
    with pytest.raises(ValueError, match=r"a.xml: image .*a.jpg: no such file"):
        load_voc(root)


def test_coco_image_listed_twice_with_different_sizes_and_bad_boxes(tmp_path):
    _image(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100}],
        "categories": [{"id": 7, "name": "cat"}],
    }
    twice = dict(coco, images=coco["images"] + [{"id": 2, "file_name": "a.png", "height": 50, "width": 60}])
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ValueError, match=r"twice.json image_id=2: image .*a.png is listed twice with different sizes: 60x40 and 60x50"):
        register_dataset(f"coco:{tmp_path / 'twice.json'}")
    bad = dict(coco, annotations=[dict(coco["annotations"][0], bbox=[5, 1, -2, 10])])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json image_id=1 \(.*a.png\) annotation 0: box \[5, 1, 3, 11\] has x2 <= x1"):
        register_dataset(f"coco:{tmp_path / 'bad.json'}")
    (tmp_path / "good.json").write_text(json.dumps(coco))
    name = f"coco:{tmp_path / 'good.json'}"
    register_dataset(name)
    assert MetadataCatalog.get(name).thing_classes == ["cat"] and _rows(name) == [(40, 60, [((1, 1, 11, 11), 0, 0)])]


def test_num_classes_0_comes_from_the_training_set_and_classes_must_match(shapes_specs, tmp_path):
    spec = shapes_specs["train"]["csv"]
    cfg = load_config(
        os.path.join(REPO, "configs", "Custom", "retina_focal_R_18_FPN_scratch_cpu.yaml"),
        ["DATASETS.TRAIN", (spec,)],
    )
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 5
    with pytest.raises(ValueError, match="DATASETS.TRAIN, which is empty: name your data"):
        resolve_num_classes(small_cfg("MODEL.RETINANET.NUM_CLASSES", 0, "DATASETS.TRAIN", (), "DATASETS.TEST", ()))
    _image(tmp_path / "a.png")
    other, _ = _csv(tmp_path, ["a.png,1,2,30,20,dog"])
    register_dataset(f"csv:{other}")
    with pytest.raises(ValueError, match=rf"dataset 'csv:{other}' has the classes \['dog'\], the training set .* has \['circle',"):
        check_same_classes([spec], f"csv:{other}")


def test_converted_ground_truth_follows_its_source(tmp_path):
    """Converted once and cached, the COCO JSON of a CSV set kept scoring the old boxes after
    they moved (AP 93 instead of 0): the file's name now holds a hash of what the set holds."""
    _image(tmp_path / "img" / "a.png", 100, 100)
    csv_file, classes_file = _csv(tmp_path, ["img/a.png,10,10,30,30,dog", "img/a.png,50,50,70,70,cat"], ["cat", "dog"])
    name = f"csv:{csv_file}:{classes_file}"
    register_dataset(name)
    out = str(tmp_path / "eval")

    def ground_truth():
        coco_json_for_evaluation(name, out)
        path = MetadataCatalog.get(name).json_file
        with open(path) as f:
            return path, sorted((a["bbox"], a["category_id"]) for a in json.load(f)["annotations"])

    first, boxes = ground_truth()
    assert ground_truth() == (first, boxes)  # unchanged: the same file, reused
    _csv(tmp_path, ["img/a.png,50,10,70,30,cat", "img/a.png,10,50,30,70,dog"], ["cat", "dog"])  # moved, classes swapped
    DatasetCatalog.remove(name), MetadataCatalog.remove(name)  # a new run (--eval-only, --resume) reads the files again
    register_dataset(name)
    second, moved = ground_truth()
    assert second != first and moved != boxes
    assert moved == sorted(([x1, y1, 20.0, 20.0], c) for x1, y1, c in [(50.0, 10.0, 0), (10.0, 50.0, 1)])  # cat 0, dog 1


def test_a_byte_order_mark_is_read_and_a_header_in_classes_csv_is_named(tmp_path):
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "ann.csv").write_text("\ufeffimg/a.png,1,2,30,20,dog\n", encoding="utf-8")  # as Excel saves CSV
    (tmp_path / "classes.csv").write_text("\ufeffdog,0\n", encoding="utf-8")
    dicts, classes = load_csv(str(tmp_path / "ann.csv"), str(tmp_path / "classes.csv"))
    assert classes == ["dog"] and dicts[0]["file_name"].endswith("img/a.png")
    (tmp_path / "classes.csv").write_text("class_name,id\ndog,0\n")
    with pytest.raises(ValueError, match=r"classes.csv line 1: .* got 'class_name,id' \(a header row\? .* delete it\)"):
        load_csv(str(tmp_path / "ann.csv"), str(tmp_path / "classes.csv"))


def test_coco_annotations_of_unlisted_images_or_without_a_box_are_named(tmp_path):
    """detectron2 dropped the first without a word and stopped on the second with KeyError: 'bbox'."""
    _image(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}], "categories": [{"id": 7, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100}]}
    orphan = dict(coco, annotations=coco["annotations"] + [dict(coco["annotations"][0], id=2, image_id=17)])
    (tmp_path / "orphan.json").write_text(json.dumps(orphan))
    with pytest.raises(ValueError, match=r"orphan.json: 1 annotation\(s\) name an image_id that 'images' does not list \(id=2 image_id=17\)"):
        register_dataset(f"coco:{tmp_path / 'orphan.json'}")
    boxless = dict(coco, annotations=[{"id": 3, "image_id": 1, "category_id": 7, "segmentation": [[1, 1, 5, 1, 5, 5]]}])
    (tmp_path / "boxless.json").write_text(json.dumps(boxless))
    with pytest.raises(ValueError, match=r"boxless.json: 1 annotation\(s\) have no 'bbox' \(id=3 image_id=1\)"):
        register_dataset(f"coco:{tmp_path / 'boxless.json'}")


def test_a_colon_in_a_folder_name_is_part_of_the_path(tmp_path):
    folder = tmp_path / "run:2"
    _image(folder / "img" / "a.png")
    csv_file, classes_file = _csv(folder, ["img/a.png,1,2,30,20,dog"], ["dog"])
    assert DatasetSpec.parse(f"csv:{csv_file}") == DatasetSpec("csv", csv_file, None)
    assert DatasetSpec.parse(f"csv:{csv_file}:{classes_file}") == DatasetSpec("csv", csv_file, classes_file)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder .*nowhere \(a spec is <format>:<path>\[:<second file>\]"):
        register_dataset(f"csv:{tmp_path / 'nowhere:x' / 'ann.csv'}")


def test_converted_ground_truth_is_reused_for_another_evaluation_folder(tmp_path):
    """The plain evaluation and TTA's evaluate the same set into two folders: one conversion."""
    _image(tmp_path / "img" / "a.png", 100, 100)
    csv_file, classes_file = _csv(tmp_path, ["img/a.png,10,10,30,30,dog"], ["dog"])
    name = f"csv:{csv_file}:{classes_file}"
    register_dataset(name)
    coco_json_for_evaluation(name, str(tmp_path / "inference"))
    first = MetadataCatalog.get(name).json_file
    coco_json_for_evaluation(name, str(tmp_path / "inference_TTA"))
    assert MetadataCatalog.get(name).json_file == first and not (tmp_path / "inference_TTA").exists()
