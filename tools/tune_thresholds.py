#!/usr/bin/env python
"""Per-class score thresholds tuned on a validation set (retina_focal/diagnostics/thresholds.py).

    python tools/tune_thresholds.py --config-file C.yaml --weights output/run/model_final.pth
    python tools/tune_thresholds.py --config-file C.yaml --results output/run/inference/<set>/coco_instances_results.json \\
        --precision 0.9 --output output/run/class_thresholds.json

For the dataset ``--dataset`` (default ``DATASETS.TEST[0]``): per class the score threshold
that maximizes F1 at IoU 0.5 (or, with ``--precision``, the lowest that reaches it), with
its precision and recall. Writes ``class_thresholds.json`` (default: beside ``--weights``,
where ``retina-focal-predict`` picks it up, else beside ``--results``) and prints the
``MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH`` line.
"""
import argparse
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from detectron2.data import MetadataCatalog  # noqa: E402

from retina_focal.diagnostics import detections_from_coco_results, ground_truth_boxes  # noqa: E402
from retina_focal.diagnostics.error_analysis import load_coco_results  # noqa: E402
from retina_focal.diagnostics.thresholds import (  # noqa: E402
    THRESHOLDS_FILE,
    ClassThreshold,
    scores_at_threshold,
    tune_thresholds,
    write_thresholds,
)
from tools.error_analysis import add_results_arguments, dataset_and_results  # noqa: E402


def table(thresholds: Sequence[ClassThreshold]) -> str:
    lines = [f"{'class':<14}{'threshold':>10}{'precision':>10}{'recall':>8}{'F1':>7}{'boxes':>7}"]
    lines += [f"{t.name:<14}{t.threshold:10.3f}{t.precision:10.3f}{t.recall:8.3f}{t.f1:7.3f}{t.num_ground_truth:7d}"
              + ("  (not tuned: the default)" if not t.tuned else "") for t in thresholds]
    return "\n".join(lines)


def main(argv=None) -> List[ClassThreshold]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_arguments(parser, eval_dir="output/tune_thresholds")
    parser.add_argument("--precision", type=float, help="instead of the best F1: the lowest threshold with this precision")
    parser.add_argument("--output", default="", help=f"JSON to write (default: {THRESHOLDS_FILE} beside --weights/--results)")
    parser.add_argument("--compare", type=float, default=0.3,
                        help="also print every class at this one threshold (retina-focal-predict's default 0.3)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    dataset, results_json = dataset_and_results(args)
    class_names = MetadataCatalog.get(dataset).thing_classes
    detections = detections_from_coco_results(load_coco_results(results_json), dataset)
    ground_truth = ground_truth_boxes(dataset)
    thresholds = tune_thresholds(ground_truth, detections, class_names, args.precision)
    criterion = "best F1 at IoU 0.5" if args.precision is None else f"precision >= {args.precision} at IoU 0.5"
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.weights or results_json)), THRESHOLDS_FILE)
    write_thresholds(thresholds, output, criterion)
    print(f"{dataset}: per-class thresholds, {criterion}\n{table(thresholds)}\n")
    same = scores_at_threshold(ground_truth, detections, class_names, args.compare)
    print(f"for comparison, one threshold {args.compare} for every class\n{table(same)}\n")
    print("MODEL:\n  RETINA_FOCAL:\n    CLASS_SCORE_THRESH: [" + ", ".join(f"{t.threshold:.3f}" for t in thresholds) + "]")
    print(f"\nwritten to {output} (retina-focal-predict uses it for weights in that folder)")
    return thresholds


if __name__ == "__main__":
    main()
