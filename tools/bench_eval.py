#!/usr/bin/env python
"""Time COCO box AP on a generated detection set: pycocotools' COCOeval (what detectron2's
COCOEvaluator uses without its compiled ``_C``) vs faster-coco-eval's ``COCOeval_faster``
(``TEST.EVALUATOR faster_coco_eval``).

    python tools/bench_eval.py --num-images 2000 --repeats 3

Both run through detectron2's ``_evaluate_predictions_on_coco`` (what COCOEvaluator calls),
on the same ground truth and detections; the script prints the median seconds of each, the
speed-up and the AP of each (which must agree).
"""
import argparse
import contextlib
import io
import statistics
import time
from typing import Dict, List, Tuple

import numpy as np
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IMAGE_SIZE = 640  # px, square; boxes of 8-256 px cover COCO's small, medium and large ranges


def synthetic_set(num_images: int, num_classes: int = 5, seed: int = 0) -> Tuple[Dict, Dict[int, Tuple]]:
    """Random ground truth and noisy detections of it.

    Per image: 1-7 boxes; each is detected with probability 0.8 with every coordinate moved by
    N(0, (0.1 x its size)^2), and 0-4 random false positives are added; scores are uniform,
    higher on average for the true detections.

    Returns:
        coco_gt (dict): a COCO json dict (category ids 0..K-1, the contiguous ids themselves).
        detections (dict): image id -> (boxes (D, 4) XYXY px, scores (D,), classes (D,)).
    """
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], {}
    for image_id in range(1, num_images + 1):
        num_gt = int(rng.integers(1, 8))
        xy = rng.uniform(0, IMAGE_SIZE - 256, (num_gt, 2))
        wh = rng.uniform(8, 256, (num_gt, 2))
        gt_classes = rng.integers(0, num_classes, num_gt)
        for box, c in zip(np.hstack([xy, wh]), gt_classes):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                 "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0}
            )
        found = rng.random(num_gt) < 0.8
        true_boxes = np.hstack([xy, xy + wh])[found] + rng.normal(0, 0.1, (int(found.sum()), 4)) * np.tile(wh[found], 2)
        num_false = int(rng.integers(0, 5))
        false_xy = rng.uniform(0, IMAGE_SIZE - 256, (num_false, 2))
        false_boxes = np.hstack([false_xy, false_xy + rng.uniform(8, 256, (num_false, 2))])
        boxes = np.vstack([true_boxes, false_boxes])  # (D, 4)
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(true_boxes)), rng.uniform(0.05, 0.7, num_false)])
        classes = np.concatenate([gt_classes[found], rng.integers(0, num_classes, num_false)])
        detections[image_id] = (boxes, scores, classes)
        images.append({"id": image_id, "width": IMAGE_SIZE, "height": IMAGE_SIZE, "file_name": f"{image_id}.jpg"})
    categories = [{"id": c, "name": f"class{c}"} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def coco_results(detections: Dict[int, Tuple]) -> List[Dict]:
    """COCO result dicts (XYWH boxes), as COCOEvaluator writes them."""
    return [
        {"image_id": image_id, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for image_id, (boxes, scores, classes) in detections.items()
        for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores, classes)
    ]


def time_cocoeval(cocoeval_cls, coco_gt_dict: Dict, results: List[Dict]) -> Tuple[float, float]:
    """Seconds of loadRes + evaluate + accumulate + summarize with ``cocoeval_cls``, and AP."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = coco_gt_dict
        coco_gt.createIndex()
        start = time.perf_counter()
        coco_eval = _evaluate_predictions_on_coco(coco_gt, results, "bbox", cocoeval_fn=cocoeval_cls)
        seconds = time.perf_counter() - start
    return seconds, float(coco_eval.stats[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="report the median of this many runs")
    args = parser.parse_args(argv)
    from faster_coco_eval import COCOeval_faster

    gt, detections = synthetic_set(args.num_images)
    results = coco_results(detections)
    print(f"{args.num_images} images, {len(gt['annotations'])} boxes, {len(results)} detections")
    medians = {}
    for name, cls in (("pycocotools", COCOeval), ("faster-coco-eval", COCOeval_faster)):
        runs = [time_cocoeval(cls, gt, results) for _ in range(args.repeats)]
        medians[name] = statistics.median(s for s, _ in runs)
        print(f"{name}: median {medians[name]:.2f} s of {[round(s, 2) for s, _ in runs]}, AP {runs[0][1]:.6f}")
    print(f"speed-up: {medians['pycocotools'] / medians['faster-coco-eval']:.1f}x")


if __name__ == "__main__":
    main()
