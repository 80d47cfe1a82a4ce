"""Datasets named on the command line: COCO JSON, Pascal VOC folders and CSV files.

A name in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (or given to a tool) that starts with a
format prefix is a dataset spec, registered in detectron2's catalogs under that very name:

* ``coco:<annotations.json>[:<image_dir>]``: a COCO instances file; images in ``image_dir``
  (default: the JSON's folder). Crowd boxes (``iscrowd: 1``) are kept as such.
* ``voc:<dir>[:<split>]``: ``<dir>/Annotations/*.xml`` with images in ``<dir>/JPEGImages``;
  the images of ``<dir>/ImageSets/Main/<split>.txt``, or every XML. Any class names: those of
  ``<dir>/classes.txt`` (one per line, in id order) if it exists, else the names found, sorted.
  Boxes follow VOC's 1-based pixel convention (as detectron2's VOC loader: x1 - 1, y1 - 1).
  ``difficult`` objects are boxes, or crowd regions with ``DATASETS.VOC_DIFFICULT_AS_CROWD``.
* ``csv:<annotations.csv>[:<classes.csv>]``: the keras-retinanet / pytorch-retinanet format,
  one box per row ``path,x1,y1,x2,y2,class_name``; ``path,,,,,`` is an image without
  objects; relative paths are relative to the CSV. Classes from ``classes.csv``
  (``class_name,id`` rows) or the names found, sorted. Rows of the class
  ``DATASETS.CSV_IGNORE_CLASS`` are crowd regions, not objects.

Every loader checks what it reads and raises a ValueError naming the file and the line (CSV)
or the object (VOC XML): wrong number of fields, a coordinate that is not a number, x2 <= x1
or y2 <= y1, an unknown class, an XML without ``<size>``, a missing image, an image listed
twice with different sizes. Boxes reaching outside their image are clipped to it, with a
count in the log. Class names go into ``MetadataCatalog`` (``thing_classes``); COCOEvaluator
reads the COCO JSON itself, and VOC and CSV sets are written as COCO JSON for it
(:func:`coco_json_for_evaluation`, cached beside the evaluation output).
"""
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from retina_focal.data.checks import oriented_size

__all__ = [
    "SPEC_FORMATS",
    "DatasetSpec",
    "coco_json_for_evaluation",
    "dataset_folder_name",
    "load_csv",
    "load_voc",
    "write_csv",
    "write_voc",
    "register_config_datasets",
    "register_dataset",
    "resolve_num_classes",
]

logger = logging.getLogger(__name__)

SPEC_FORMATS = ("coco", "voc", "csv")
_CSV_FIELDS = 6  # path, x1, y1, x2, y2, class_name


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``<format>:<path>[:<extra>]`` dataset name."""

    format: str
    path: str
    extra: Optional[str] = None

    @classmethod
    def parse(cls, name: str) -> Optional["DatasetSpec"]:
        """The spec ``name`` is, or None for a plain (registered) dataset name. The path ends at
        the first ``:`` after which what comes before exists (so a folder with a ``:`` in its
        name works), else at the first ``:``."""
        prefix, sep, rest = name.partition(":")
        if not sep or prefix not in SPEC_FORMATS:
            return None
        splits = [(rest[:i], rest[i + 1 :]) for i, c in enumerate(rest) if c == ":"] + [(rest, "")]
        path, extra = next(((p, e) for p, e in splits if os.path.exists(os.path.expanduser(p))), rest.partition(":")[::2])
        if not path:
            raise ValueError(f"dataset spec {name!r} names no file: use {prefix}:<path>")
        return cls(prefix, os.path.expanduser(path), os.path.expanduser(extra) if extra else None)


def dataset_folder_name(name: str) -> str:
    """A file-system-safe folder name for a dataset name (specs hold slashes and colons)."""
    if DatasetSpec.parse(name) is None:
        return name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:]
    return f"{stem}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class _Problems:
    """Collects the clipped boxes of a load, for one log line."""

    def __init__(self, source: str):
        self.source = source
        self.clipped = 0

    def clip(self, box: List[float], width: int, height: int) -> List[float]:
        clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                   min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
        self.clipped += clipped != box
        return clipped

    def report(self) -> None:
        if self.clipped:
            logger.warning(f"{self.source}: {self.clipped} box(es) reached outside their image and were clipped to it")


def _check_box(box: Sequence[float], where: str) -> None:
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has x2 <= x1 or y2 <= y1")


def _annotation(box: List[float], category_id: int, crowd: bool) -> Dict:
    return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id, "iscrowd": int(crowd)}


class _Images:
    """One record per image file, in order of first appearance; a second listing must agree."""

    def __init__(self):
        self.records: Dict[str, Dict] = {}

    def record(self, file_name: str, height: int, width: int, where: str) -> Dict:
        record = self.records.get(file_name)
        if record is None:
            record = {"file_name": file_name, "image_id": len(self.records), "height": height, "width": width,
                      "annotations": []}
            self.records[file_name] = record
        elif (record["height"], record["width"]) != (height, width):
            raise ValueError(
                f"{where}: image {file_name} is listed twice with different sizes: "
                f"{record['width']}x{record['height']} and {width}x{height}"
            )
        return record


def _image_size(path: str, where: str) -> Tuple[int, int]:
    """(height, width) from the image header, as detectron2 reads the image (EXIF orientation)."""
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image {path}: no such file")
    try:
        with Image.open(path) as image:
            return oriented_size(image)
    except Exception as e:  # PIL: UnidentifiedImageError, OSError
        raise ValueError(f"{where}: image {path} cannot be read ({type(e).__name__}: {e})") from e


def _class_names_file(path: str, kind: str) -> List[str]:
    """Names in id order from ``name,id`` rows (CSV) or one name per line (VOC classes.txt)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first name
        if kind == "txt":
            return [line.strip() for line in f if line.strip()]
        rows = [row for row in csv.reader(f) if row]
    by_id = {}
    for line, row in enumerate(rows, 1):
        if len(row) != 2 or not row[1].strip().lstrip("-").isdigit():
            header = " (a header row? keras-retinanet's classes file has none: delete it)" if line == 1 else ""
            raise ValueError(f"{path} line {line}: expected rows 'class_name,id' with an integer id, got {','.join(row)!r}{header}")
        by_id[int(row[1])] = row[0].strip()
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{path}: class ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return [by_id[i] for i in range(len(by_id))]


def _number(text: str, where: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {field} {text!r} is not a number") from None


def load_csv(csv_file: str, classes_file: Optional[str] = None, ignore_class: str = "") -> Tuple[List[Dict], List[str]]:
    """Dataset dicts and class names of a keras-retinanet CSV (module docstring).

    Args:
        csv_file (str): rows ``path,x1,y1,x2,y2,class_name`` (or ``path,,,,,``).
        classes_file (str or None): ``class_name,id`` rows; None: the names found, sorted.
        ignore_class (str): rows of this class are crowd regions (not a class); "" = none.
    """
    root = os.path.dirname(os.path.abspath(csv_file))
    with open(csv_file, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first path
        rows = list(enumerate(csv.reader(f), 1))
    rows = [(line, [v.strip() for v in row]) for line, row in rows if row and any(v.strip() for v in row)]
    for line, row in rows:
        if len(row) != _CSV_FIELDS:
            raise ValueError(f"{csv_file} line {line}: expected 6 fields path,x1,y1,x2,y2,class_name, got {len(row)}: {row}")
    found = sorted({row[5] for _, row in rows if row[5] and row[5] != ignore_class})
    classes = _class_names_file(classes_file, "csv") if classes_file else found
    unknown = [name for name in found if name not in classes]
    images, problems = _Images(), _Problems(csv_file)
    for line, (path, x1, y1, x2, y2, name) in rows:
        where = f"{csv_file} line {line}"
        file_name = path if os.path.isabs(path) else os.path.join(root, path)
        record = images.record(file_name, *_image_size(file_name, where), where)
        if not any((x1, y1, x2, y2, name)):
            continue  # an image without objects
        if not name:
            raise ValueError(f"{where}: box {[x1, y1, x2, y2]} has no class name (the 6th field is empty)")
        if name in unknown:
            raise ValueError(f"{where}: class {name!r} is not in {classes_file} ({classes})")
        box = [_number(v, where, field) for v, field in zip((x1, y1, x2, y2), ("x1", "y1", "x2", "y2"))]
        _check_box(box, where)
        box = problems.clip(box, record["width"], record["height"])
        crowd = bool(ignore_class) and name == ignore_class
        record["annotations"].append(_annotation(box, 0 if crowd else classes.index(name), crowd))
    problems.report()
    return list(images.records.values()), classes


def _voc_ids(root: str, split: Optional[str]) -> List[str]:
    if split is None:
        return sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, "Annotations")) if n.endswith(".xml"))
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        raise ValueError(f"VOC split {split!r}: no such file {path}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _voc_objects(xml_file: str) -> Tuple[str, int, int, List[Tuple[str, List[float], bool, str]]]:
    """(image file name, height, width, [(class name, XYXY box, difficult, where)]) of one XML."""
    tree = ET.parse(xml_file)
    size = tree.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError(f"{xml_file}: no <size> with <width> and <height>")
    width, height = (int(round(_number(size.findtext(k), xml_file, k))) for k in ("width", "height"))
    file_name = tree.findtext("filename") or os.path.splitext(os.path.basename(xml_file))[0] + ".jpg"
    objects = []
    for i, obj in enumerate(tree.findall("object")):
        where = f"{xml_file} object {i}"
        box_node = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if box_node is None or not name:
            raise ValueError(f"{where}: needs <name> and <bndbox>")
        box = [_number(box_node.findtext(k) or "", where, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        box[0] -= 1.0  # VOC pixel indexes are 1-based (as in detectron2's VOC loader)
        box[1] -= 1.0
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, box, difficult, where))
    return file_name, height, width, objects


def load_voc(root: str, split: Optional[str] = None, difficult_as_crowd: bool = False) -> Tuple[List[Dict], List[str]]:
    """Dataset dicts and class names of a Pascal VOC style folder (module docstring)."""
    parsed = [(xml, _voc_objects(xml)) for xml in (os.path.join(root, "Annotations", f"{i}.xml") for i in _voc_ids(root, split))]
    classes_txt = os.path.join(root, "classes.txt")
    found = sorted({name for _, (_, _, _, objects) in parsed for name, *_ in objects})
    classes = _class_names_file(classes_txt, "txt") if os.path.isfile(classes_txt) else found
    images, problems = _Images(), _Problems(root)
    for xml, (file_name, height, width, objects) in parsed:
        path = os.path.join(root, "JPEGImages", file_name)
        if not os.path.isfile(path):
            raise ValueError(f"{xml}: image {path}: no such file")
        record = images.record(path, height, width, xml)
        for name, box, difficult, where in objects:
            if name not in classes:
                raise ValueError(f"{where}: class {name!r} is not in {classes_txt} ({classes})")
            _check_box(box, where)
            box = problems.clip(box, width, height)
            record["annotations"].append(_annotation(box, classes.index(name), difficult and difficult_as_crowd))
    problems.report()
    return list(images.records.values()), classes


def _check_coco_annotations(json_file: str) -> None:
    """What detectron2's ``load_coco_json`` drops or fails on without naming it: annotations of
    image ids that ``images`` does not list (dropped silently) and annotations without a
    ``bbox`` (a bare ``KeyError: 'bbox'``)."""
    with open(json_file) as f:
        coco = json.load(f)
    image_ids = {image["id"] for image in coco.get("images", [])}
    annotations = coco.get("annotations", [])
    orphans = [a for a in annotations if a.get("image_id") not in image_ids]
    if orphans:
        listed = ", ".join(f"id={a.get('id')} image_id={a.get('image_id')}" for a in orphans[:5])
        raise ValueError(f"{json_file}: {len(orphans)} annotation(s) name an image_id that 'images' does not list ({listed}); "
                         "they would be dropped without a word: add the images or remove the annotations")
    boxless = [a for a in annotations if "bbox" not in a]
    if boxless:
        listed = ", ".join(f"id={a.get('id')} image_id={a.get('image_id')}" for a in boxless[:5])
        raise ValueError(f"{json_file}: {len(boxless)} annotation(s) have no 'bbox' ({listed}); RetinaFocal needs a box "
                         "for every annotation (segmentation-only annotations: derive their boxes first)")


def _load_coco(json_file: str, image_dir: Optional[str], name: str) -> Tuple[List[Dict], List[str]]:
    _check_coco_annotations(json_file)
    dicts = load_coco_json(json_file, image_dir or os.path.dirname(os.path.abspath(json_file)), dataset_name=name)
    images, problems = _Images(), _Problems(json_file)
    for record in dicts:
        images.record(record["file_name"], record["height"], record["width"], f"{json_file} image_id={record['image_id']}")
        for i, ann in enumerate(record.get("annotations", [])):
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            _check_box(box, f"{json_file} image_id={record['image_id']} ({record['file_name']}) annotation {i}")
            ann["bbox"], ann["bbox_mode"] = problems.clip(box, record["width"], record["height"]), BoxMode.XYXY_ABS
    problems.report()
    return dicts, list(MetadataCatalog.get(name).thing_classes)


def _loader(spec: DatasetSpec, name: str, voc_difficult_as_crowd: bool, csv_ignore_class: str) -> Callable[[], Tuple]:
    if spec.format == "coco":
        return lambda: _load_coco(spec.path, spec.extra, name)
    if spec.format == "voc":
        return lambda: load_voc(spec.path, spec.extra, voc_difficult_as_crowd)
    return lambda: load_csv(spec.path, spec.extra, csv_ignore_class)


def register_dataset(name: str, *, voc_difficult_as_crowd: bool = False, csv_ignore_class: str = "") -> Optional[str]:
    """Register the dataset spec ``name`` (once per process).

    The files are read here, so that a bad file fails at start-up and ``thing_classes`` is
    known before training (e.g. for ``MODEL.RETINANET.NUM_CLASSES 0``).

    Returns:
        str or None: what was registered (images, classes), None if ``name`` is no spec or
        was registered before.
    """
    spec = DatasetSpec.parse(name)
    if spec is None or name in DatasetCatalog.list():
        return None
    if not os.path.exists(spec.path):
        raise FileNotFoundError(
            f"dataset {name!r}: no such file or folder {spec.path} (a spec is <format>:<path>[:<second file>]; "
            "a ':' in a path is read as part of it only when the path before it exists)"
        )
    dicts, classes = _loader(spec, name, voc_difficult_as_crowd, csv_ignore_class)()
    DatasetCatalog.register(name, lambda: dicts)
    metadata = MetadataCatalog.get(name)
    if spec.format == "coco":  # COCOEvaluator reads the ground truth from it
        metadata.set(json_file=spec.path)
    else:
        metadata.set(thing_classes=classes)
    metadata.set(evaluator_type="coco")
    return f"Registered {name}: {len(dicts)} images, {len(classes)} classes {classes}"


def register_config_datasets(cfg, extra: Sequence[str] = (), *, skip_missing: bool = False) -> List[str]:
    """Register every spec of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` and of ``extra`` (e.g. a
    tool's ``--dataset``) with ``cfg``'s ``DATASETS`` options; returns what was registered.
    With ``skip_missing`` (inference: predict, export) a spec whose file is not there is left
    out with a note instead of being an error."""
    notes = []
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) + list(extra):
        spec = DatasetSpec.parse(name)
        if skip_missing and spec is not None and not os.path.exists(spec.path):
            notes.append(f"dataset {name!r} is not here ({spec.path}): not registered (inference needs no data)")
            continue
        notes.append(register_dataset(
            name, voc_difficult_as_crowd=cfg.DATASETS.VOC_DIFFICULT_AS_CROWD, csv_ignore_class=cfg.DATASETS.CSV_IGNORE_CLASS
        ))
    return [n for n in notes if n]


def records_digest(name: str) -> str:
    """A hash of what dataset ``name`` holds: its class names and every record (file, size,
    boxes, classes), as this process read them when it registered the set."""
    records = DatasetCatalog.get(name)
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    text = json.dumps([classes, records], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def coco_json_for_evaluation(name: str, output_dir: str) -> None:
    """Give a VOC or CSV dataset a COCO JSON for COCOEvaluator, set as the metadata's
    ``json_file``: detectron2's ``convert_to_coco_json`` into ``output_dir``, under a name that
    holds :func:`records_digest`, so a converted file is reused only while the annotations,
    classes and images it came from are unchanged (moved boxes, another class order, an added
    image: a new file). Nothing to do for COCO sets and registered datasets: they have one."""
    spec = DatasetSpec.parse(name)
    if spec is None or spec.format == "coco":
        return
    suffix = f"_{records_digest(name)}_coco_format.json"
    metadata = MetadataCatalog.get(name)
    converted = metadata.get("json_file", None)
    if converted and converted.endswith(suffix) and os.path.isfile(converted):
        return  # converted from these records already (e.g. by the plain evaluation before TTA's)
    path = os.path.join(output_dir, dataset_folder_name(name) + suffix)
    convert_to_coco_json(name, path, allow_cached=True)
    if converted:  # from other records: the set was registered again
        del metadata.json_file
    metadata.set(json_file=path)


def resolve_num_classes(cfg) -> Optional[str]:
    """``MODEL.RETINANET.NUM_CLASSES 0``: the number of classes of the first training set
    (its ``thing_classes``; the first test set's when there is no training set, as for
    ``--eval-only``), in place. Returns what it set (for the log), or None."""
    if cfg.MODEL.RETINANET.NUM_CLASSES != 0:
        return None
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    classes = MetadataCatalog.get(names[0]).get("thing_classes", None) if names else None
    if not names:
        raise ValueError(
            "MODEL.RETINANET.NUM_CLASSES 0 takes the number of classes from DATASETS.TRAIN, which is empty: "
            "name your data, e.g. DATASETS.TRAIN '(\"csv:train.csv\",)' (coco:, voc:, csv: or a registered name)"
        )
    if not classes:
        raise ValueError(
            f"MODEL.RETINANET.NUM_CLASSES 0 takes the number of classes from DATASETS.TRAIN, but dataset "
            f"{names[0]!r} has no thing_classes metadata; set MODEL.RETINANET.NUM_CLASSES"
        )
    cfg.MODEL.RETINANET.NUM_CLASSES = len(classes)
    return f"MODEL.RETINANET.NUM_CLASSES 0: {len(classes)} classes of {names[0]} {list(classes)}"


# ---------------------------------------------------------------- writers (round trip)


def _xyxy_boxes(record: Dict) -> Iterable[Tuple[List[float], Dict]]:
    for ann in record.get("annotations", []):
        yield BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS), ann


def write_csv(dicts: Sequence[Dict], classes: Sequence[str], csv_file: str, classes_file: str) -> None:
    """Write ``dicts`` as a keras-retinanet CSV (image paths relative to it) and its classes
    file; :func:`load_csv` reads them back to the same boxes and classes."""
    root = os.path.dirname(os.path.abspath(csv_file))
    os.makedirs(root, exist_ok=True)
    with open(csv_file, "w", newline="") as f:
        writer = csv.writer(f)
        for record in dicts:
            path = os.path.relpath(record["file_name"], root)
            boxes = list(_xyxy_boxes(record))
            writer.writerows([[path, *(f"{v:g}" for v in box), classes[ann["category_id"]]] for box, ann in boxes])
            if not boxes:
                writer.writerow([path, "", "", "", "", ""])
    with open(classes_file, "w", newline="") as f:
        csv.writer(f).writerows([name, i] for i, name in enumerate(classes))


def write_voc(dicts: Sequence[Dict], classes: Sequence[str], root: str, split: str) -> None:
    """Write ``dicts`` as the split ``split`` of a VOC folder (Annotations/, JPEGImages/ with
    copies of the images named ``<split>_<name>``, ImageSets/Main/<split>.txt, classes.txt);
    :func:`load_voc` reads it back to the same boxes and classes."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = []
    for record in dicts:
        stem, ext = os.path.splitext(os.path.basename(record["file_name"]))
        stem = f"{split}_{stem}"  # splits may reuse file names
        shutil.copyfile(record["file_name"], os.path.join(root, "JPEGImages", stem + ext))
        xml = ET.Element("annotation")
        ET.SubElement(xml, "filename").text = stem + ext
        size = ET.SubElement(xml, "size")
        ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(record["width"]), str(record["height"])
        for box, ann in _xyxy_boxes(record):
            obj = ET.SubElement(xml, "object")
            ET.SubElement(obj, "name").text = classes[ann["category_id"]]
            ET.SubElement(obj, "difficult").text = str(int(ann.get("iscrowd", 0)))
            node = ET.SubElement(obj, "bndbox")
            corners = (box[0] + 1, box[1] + 1, box[2], box[3])  # 1-based, as VOC
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), corners):
                ET.SubElement(node, key).text = f"{value:g}"
        ET.ElementTree(xml).write(os.path.join(root, "Annotations", stem + ".xml"))
        ids.append(stem)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
