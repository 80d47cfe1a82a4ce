#!/usr/bin/env python
"""A small detection set of real photographs, for choosing fine-tuning recipes: 400-px tiles of
the Hubble Deep Field photograph that scikit-image ships (``skimage.data.hubble_deep_field()``,
872 x 1000 RGB), one class ("object"), a box per galaxy or star found in the picture.

    pip install scikit-image
    python tools/photo_tiles.py --output datasets/photo_tiles
    python train_net.py --config-file configs/Custom/retina_focal_MobileNetV2_FPN_finetune_cpu.yaml \\
        DATASETS.TRAIN '("coco:datasets/photo_tiles/train.json:datasets/photo_tiles/images",)' \\
        DATASETS.TEST '("coco:datasets/photo_tiles/val.json:datasets/photo_tiles/images",)'

How the boxes are derived: the grey image is smoothed (Gaussian, σ 1.5 px), thresholded at
Otsu's level and split into connected regions; each region's bounding box is an object when its
longer side is at least ``MIN_SIDE`` (8) px, and a crowd region (``iscrowd`` 1: ignored by
COCOEvaluator, background in training as in the paper) when smaller. The left 600 columns give
the training tiles (``--train-tiles`` squares of 400 px at random positions, overlapping), the
right 400 columns the validation tiles (4 squares of 400 px stepping down the column), so no
pixel is in both. A box cut by a tile's edge keeps its visible part; it becomes a crowd region
when less than half of it is visible. Objects are 8-50 px, like small objects in aerial tiles.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

TILE = 400
MIN_SIDE = 8
TRAIN_COLUMNS = 600  # columns [0, 600) train, [600, 1000) validation


def find_objects(image: np.ndarray) -> np.ndarray:
    """XYXY boxes (float, pixel edges) of the bright regions of an RGB ``image``."""
    from skimage import color, filters, measure

    grey = filters.gaussian(color.rgb2gray(image), sigma=1.5)
    regions = measure.regionprops(measure.label(grey > filters.threshold_otsu(grey)))
    # regionprops' bbox is (min_row, min_col, max_row, max_col), max exclusive
    return np.array([[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in regions], dtype=np.float64).reshape(-1, 4)


def tile_annotations(boxes: np.ndarray, x0: int, y0: int, size: int) -> List[Dict]:
    """COCO annotations (category 1) of the ``boxes`` visible in the tile at ``(x0, y0)``."""
    clipped = boxes - [x0, y0, x0, y0]
    clipped = np.clip(clipped, 0, size)
    annotations = []
    for full, box in zip(boxes, clipped):
        w, h = box[2] - box[0], box[3] - box[1]
        if w <= 0 or h <= 0:
            continue
        visible = w * h / ((full[2] - full[0]) * (full[3] - full[1]))
        crowd = max(full[2] - full[0], full[3] - full[1]) < MIN_SIDE or visible < 0.5
        bbox = [float(box[0]), float(box[1]), float(w), float(h)]
        annotations.append({"bbox": bbox, "area": float(w * h), "category_id": 1, "iscrowd": int(crowd)})
    return annotations


def tile_positions(num_train: int, seed: int, height: int, width: int) -> Dict[str, List[Tuple[int, int]]]:
    """Top-left corners of the training tiles (random, in the left columns) and of the
    validation tiles (evenly down the right columns)."""
    rng = np.random.default_rng(seed)
    train = [(int(rng.integers(0, TRAIN_COLUMNS - TILE + 1)), int(rng.integers(0, height - TILE + 1))) for _ in range(num_train)]
    val = [(width - TILE, int(y)) for y in np.linspace(0, height - TILE, 4).round()]
    return {"train": train, "val": val}


def build(output: str, num_train: int = 30, seed: int = 0) -> Dict[str, str]:
    """Write ``OUTPUT/images/*.png`` and ``OUTPUT/{train,val}.json``; return the two specs."""
    from skimage import data

    image = data.hubble_deep_field()
    boxes = find_objects(image)
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    specs = {}
    for split, positions in tile_positions(num_train, seed, *image.shape[:2]).items():
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
        for i, (x0, y0) in enumerate(positions):
            file_name = f"{split}_{i:03d}.png"
            Image.fromarray(image[y0 : y0 + TILE, x0 : x0 + TILE]).save(os.path.join(output, "images", file_name))
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": file_name, "height": TILE, "width": TILE})
            for ann in tile_annotations(boxes, x0, y0, TILE):
                coco["annotations"].append(dict(ann, id=len(coco["annotations"]) + 1, image_id=image_id))
        json_file = os.path.join(output, f"{split}.json")
        with open(json_file, "w") as f:
            json.dump(coco, f)
        objects = sum(not a["iscrowd"] for a in coco["annotations"])
        print(f"{split}: {len(positions)} tiles, {objects} objects, {len(coco['annotations']) - objects} crowd regions")
        specs[split] = f"coco:{json_file}:{os.path.join(output, 'images')}"
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="datasets/photo_tiles")
    parser.add_argument("--train-tiles", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import skimage  # noqa: F401
    except ImportError:
        print("tools/photo_tiles.py needs scikit-image: pip install scikit-image", file=sys.stderr)
        return 2
    specs = build(os.path.abspath(args.output), args.train_tiles, args.seed)
    print(f"DATASETS.TRAIN '(\"{specs['train']}\",)' DATASETS.TEST '(\"{specs['val']}\",)'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
