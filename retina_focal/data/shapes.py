"""A deterministic synthetic detection dataset: "retina_focal_shapes".

Five classes that differ by form only (colour is random per object): filled ellipse
("circle"), rectangle ("square"), triangle, plus-shaped "cross" and hollow ellipse
("ring"). Objects range from ~8 px to most of the image (so P3–P7 all get work), with
varied aspect ratios, partial overlaps, line/blob clutter that is not an object, on
textured backgrounds; a few images hold no object. Image ``i`` of a split depends only on
(seed, split, i), so every machine generates the same files.

The imbalance family (:data:`IMBALANCE_LEVELS`) raises the number of background anchors per
foreground anchor and nothing else: each level's training split is the demo's 2,000 images,
pixel for pixel, followed by images of background and clutter only, so a batch holds the
same objects among more negatives (docs/ablations_shapes.md).

Images are written once, as PNG, with a COCO-format JSON beside them, under
``<root>/retina_focal_shapes/<split>_<params>/`` where root is ``$RETINA_FOCAL_DATASETS``,
else ``$DETECTRON2_DATASETS``, else ``datasets/`` in the current directory.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "IMBALANCE_LEVELS",
    "SHAPE_CLASSES",
    "ShapesSplit",
    "default_root",
    "generate_split",
    "register_builtin_shapes",
    "register_shapes",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")
_GENERATOR_VERSION = 2  # bump when drawing changes, so caches are rebuilt
DEMO_NUM_TRAIN, DEMO_NUM_VAL = 2000, 200
# level name -> training images per demo training image; the extra ones hold no object.
# At 128 px (3,069 anchors, ~21 foreground per demo image) the training batches measure
# 1:144, 1:542, 1:1,206 and 1:5,320 background per foreground anchor (docs/ablations_shapes.md);
# the last is the paper's COCO regime (~100k anchors per image, a handful foreground, §1).
IMBALANCE_LEVELS = {"x1": 1, "x4": 4, "x10": 10, "x22": 22}


@dataclass(frozen=True)
class ShapesSplit:
    """Parameters of one split; the cache folder name is derived from them."""

    split: str
    num_images: int
    image_size: int = 128
    seed: int = 0
    max_objects: int = 6
    min_size: int = 8
    empty_fraction: float = 0.05
    num_added_empty: int = 0  # images of background and clutter only, after the num_images

    def folder_name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.split}_n{self.num_images}_px{self.image_size}_v{_GENERATOR_VERSION}_{digest}"


def default_root() -> str:
    """``$RETINA_FOCAL_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return os.environ.get("RETINA_FOCAL_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise + a gradient + pixel noise: texture without objects."""
    coarse = rng.uniform(40, 215, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    img += rng.uniform(-30, 30) * ramp[None, :, None] + rng.uniform(-30, 30) * ramp[:, None, None]
    img += rng.normal(0, rng.uniform(4, 14), size=img.shape).astype(np.float32)
    return img


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Lines and small blobs that are not objects (so colour edges alone mean nothing)."""
    size = img.shape[0]
    for _ in range(rng.integers(0, 5)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), _colour(rng), int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, 4)):
        c = rng.integers(0, size, 2)
        cv2.circle(img, tuple(int(v) for v in c), int(rng.integers(1, 3)), _colour(rng), -1)


def _colour(rng: np.random.Generator) -> Tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(0, 255, 3))


def _draw(img: np.ndarray, cls: int, box: np.ndarray, colour, thickness: int) -> None:
    """Draw shape ``cls`` filling the box (x1, y1, x2, y2) so that the box is tight."""
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    name = SHAPE_CLASSES[cls]
    if name in ("circle", "ring"):
        # a stroke is centred on the outline: pull a ring's outline in by half its width
        inset = 0 if name == "circle" else thickness // 2
        axes = (max(int(round(w / 2)) - inset, 1), max(int(round(h / 2)) - inset, 1))
        cv2.ellipse(img, (int(round(cx)), int(round(cy))), axes, 0, 0, 360, colour, -1 if name == "circle" else thickness)
    elif name == "square":
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), colour, -1)
    elif name == "triangle":
        pts = np.array([[cx, y1], [x2, y2], [x1, y2]], dtype=np.int32)
        cv2.fillPoly(img, [pts], colour)
    else:  # cross: a vertical and a horizontal bar of a third of the box
        bw, bh = max(w / 3, 1), max(h / 3, 1)
        cv2.rectangle(img, (int(cx - bw / 2), int(y1)), (int(cx + bw / 2), int(y2)), colour, -1)
        cv2.rectangle(img, (int(x1), int(cy - bh / 2)), (int(x2), int(cy + bh / 2)), colour, -1)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _sample_box(rng: np.random.Generator, spec: ShapesSplit) -> np.ndarray:
    """Log-uniform size from min_size to 0.8·image, aspect ratio in [1/2, 2]."""
    size = spec.image_size
    side = np.exp(rng.uniform(np.log(spec.min_size), np.log(0.8 * size)))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    w, h = min(side * np.sqrt(ratio), size - 2), min(side / np.sqrt(ratio), size - 2)
    x1, y1 = rng.uniform(0, size - w - 1), rng.uniform(0, size - h - 1)
    return np.array([x1, y1, x1 + w, y1 + h]).round()


def render_image(spec: ShapesSplit, index: int) -> Tuple[np.ndarray, List[Dict]]:
    """Image ``index`` of the split (BGR uint8) and its annotations (XYWH boxes, class ids)."""
    split_id = int(hashlib.sha1(spec.split.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([spec.seed, split_id, index])
    img = _background(rng, spec.image_size)
    _clutter(rng, img)
    added_empty = index >= spec.num_images
    num = 0 if added_empty or rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    boxes: List[np.ndarray] = []
    for _ in range(num):
        for _attempt in range(10):  # partial overlaps allowed, heavy occlusion not
            box = _sample_box(rng, spec)
            if not boxes or _iou(box, np.stack(boxes)).max() < 0.3:
                boxes.append(box)
                break
    boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))  # large first: none is hidden
    annotations = []
    for box in boxes:
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        thickness = int(max(2, min(box[2] - box[0], box[3] - box[1]) / 6))
        _draw(img, cls, box, _colour(rng), thickness)
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append({"bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "category_id": cls})
    return np.clip(img, 0, 255).astype(np.uint8), annotations


def generate_split(spec: ShapesSplit, root: str) -> Tuple[str, str]:
    """Write the split's PNGs and COCO JSON once (atomically); return (json_file, image_root)."""
    base = os.path.join(root, "retina_focal_shapes")
    folder = os.path.join(base, spec.folder_name())
    json_file = os.path.join(folder, "annotations.json")
    if os.path.exists(json_file):
        return json_file, folder
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{spec.folder_name()}.", dir=base)
    total = spec.num_images + spec.num_added_empty
    logger.info(f"Generating {total} '{spec.split}' shapes images in {folder} ...")
    images, annotations = [], []
    for i in range(total):
        img, anns = render_image(spec, i)
        file_name = f"{i:06d}.png"
        cv2.imwrite(os.path.join(tmp, file_name), img)
        images.append({"id": i + 1, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
        for ann in anns:
            w, h = ann["bbox"][2:]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": ann["category_id"] + 1,
                 "bbox": ann["bbox"], "area": w * h, "iscrowd": 0}
            )
    coco = {
        "info": {"description": f"retina_focal shapes, {asdict(spec)}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }
    with open(os.path.join(tmp, "annotations.json"), "w") as f:
        json.dump(coco, f)
    try:
        os.rename(tmp, folder)  # atomic: concurrent ranks either win or find it done
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(json_file):
            raise
    return json_file, folder


def register_shapes(
    root: str = None,
    num_train: int = DEMO_NUM_TRAIN,
    num_val: int = DEMO_NUM_VAL,
    image_size: int = 128,
    seed: int = 0,
    prefix: str = "retina_focal_shapes",
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val``; files are generated on first use.

    Registering again (same or other parameters) replaces the earlier registration.

    Returns:
        list[str]: the registered dataset names.
    """
    return [
        _register_split(f"{prefix}_{split}", ShapesSplit(split, num, image_size, seed), root or default_root())
        for split, num in (("train", num_train), ("val", num_val))
    ]


def register_imbalance_level(level: str, root: str = None) -> str:
    """Register ``retina_focal_shapes_<level>_train`` for a level of :data:`IMBALANCE_LEVELS`:
    the demo's training images and (multiple − 1) × as many images without objects. Its
    validation set is the demo's, ``retina_focal_shapes_val``."""
    extra = (IMBALANCE_LEVELS[level] - 1) * DEMO_NUM_TRAIN
    spec = ShapesSplit("train", DEMO_NUM_TRAIN, num_added_empty=extra)
    return _register_split(f"retina_focal_shapes_{level}_train", spec, root or default_root())


def register_builtin_shapes(root: str = None) -> List[str]:
    """Register the demo pair ``retina_focal_shapes_{train,val}`` (2000/200 images), the
    ``retina_focal_shapes_tiny_{train,val}`` pair (48/16 images) used by tests and smoke runs,
    and the training sets of the imbalance levels, ``retina_focal_shapes_x{1,4,10,22}_train``."""
    names = register_shapes(root) + register_shapes(root, num_train=48, num_val=16, prefix="retina_focal_shapes_tiny")
    return names + [register_imbalance_level(level, root) for level in IMBALANCE_LEVELS]


def _register_split(name: str, spec: ShapesSplit, root: str) -> str:
    folder = os.path.join(root, "retina_focal_shapes", spec.folder_name())
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _load(spec, root, name))
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPE_CLASSES),
        json_file=os.path.join(folder, "annotations.json"),
        image_root=folder,
        evaluator_type="coco",
    )
    return name


def _load(spec: ShapesSplit, root: str, name: str) -> List[Dict]:
    json_file, image_root = generate_split(spec, root)
    return load_coco_json(json_file, image_root, dataset_name=name)
