#!/usr/bin/env python
"""Write the built-in shapes dataset in the three formats that ``DATASETS.TRAIN`` /
``DATASETS.TEST`` accept as specs (retina_focal/data/formats.py), for the README's "Train on
your own data" section and its tests.

    python tools/shapes_formats.py --output datasets/shapes_formats            # demo splits (2000 / 200)
    python tools/shapes_formats.py --output /tmp/shapes --tiny                 # 48 / 16 images

Writes ``OUTPUT/voc/`` (Annotations, JPEGImages, ImageSets/Main/{train,val}.txt,
classes.txt) and ``OUTPUT/csv/{train,val}.csv`` with ``classes.csv``; the COCO JSONs are the
generated ones. Same images, boxes, image order and class order in all three, so the three
specs train and evaluate to the same AP. Prints the specs to paste.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from detectron2.data.datasets import load_coco_json  # noqa: E402

from retina_focal.data.formats import write_csv, write_voc  # noqa: E402
from retina_focal.data.shapes import (  # noqa: E402
    SHAPE_CLASSES,
    ShapesSplit,
    default_root,
    generate_split,
)


def export(output: str, tiny: bool = False, root: str = "") -> dict:
    """Write the VOC and CSV copies of the shapes train and val splits; return
    ``{split: {"coco": spec, "voc": spec, "csv": spec}}``."""
    sizes = {"train": 48, "val": 16} if tiny else {"train": 2000, "val": 200}
    output = os.path.abspath(output)
    specs = {}
    for split, num_images in sizes.items():
        json_file, image_root = generate_split(ShapesSplit(split=split, num_images=num_images), root or default_root())
        dicts = load_coco_json(json_file, image_root)
        for record in dicts:  # load_coco_json without a dataset name keeps COCO's 1-based category ids
            for ann in record["annotations"]:
                ann["category_id"] -= 1
        write_voc(dicts, SHAPE_CLASSES, os.path.join(output, "voc"), split)
        csv_file, classes_file = (os.path.join(output, "csv", f) for f in (f"{split}.csv", "classes.csv"))
        write_csv(dicts, SHAPE_CLASSES, csv_file, classes_file)
        specs[split] = {
            "coco": f"coco:{json_file}:{image_root}",
            "voc": f"voc:{os.path.join(output, 'voc')}:{split}",
            "csv": f"csv:{csv_file}:{classes_file}",
        }
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="datasets/shapes_formats")
    parser.add_argument("--tiny", action="store_true", help="the 48 / 16 image splits the tests use")
    args = parser.parse_args(argv)
    for split, by_format in export(args.output, args.tiny).items():
        for fmt, spec in by_format.items():
            print(f"{split:5s} {fmt:4s} {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
