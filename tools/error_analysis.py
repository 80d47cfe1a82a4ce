#!/usr/bin/env python
"""Error analysis after evaluation: per-class AP (worst first), precision–recall curves,
a confusion matrix and the types of false positives.

    # from the results COCOEvaluator wrote
    python tools/error_analysis.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --results output/shapes_demo/inference/retina_focal_shapes_val/coco_instances_results.json \\
        --output-dir docs/figures
    # or run the model first (COCOEvaluator writes the results into --eval-dir)
    python tools/error_analysis.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --weights output/shapes_demo/model_final.pth --output-dir docs/figures

The dataset is ``--dataset`` (default ``DATASETS.TEST[0]``). Definitions (true positive,
confusion matrix, localization / confusion / background false positives) are in
``retina_focal/diagnostics/error_analysis.py`` and docs/diagnostics.md. Writes
``<prefix>pr_curves.png`` and ``<prefix>confusion.png`` into ``--output-dir``.
"""
import argparse
import os
from typing import Dict, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import inference_on_dataset

from retina_focal.config.load import load_config
from retina_focal.data import register_config_datasets
from retina_focal.diagnostics import (
    coco_evaluation,
    confusion_table,
    detections_from_coco_results,
    ground_truth_boxes,
    match_detections,
    per_class_ap,
    precision_recall,
)
from retina_focal.diagnostics.error_analysis import load_coco_results
from retina_focal.diagnostics.plots import plot_confusion, plot_precision_recall
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.export.predictor import load_inference_model

PR_IOUS = (0.5, 0.75)  # one panel each


def run_model(cfg, weights: str, dataset_name: str, eval_dir: str) -> str:
    """Evaluate ``weights`` on ``dataset_name`` with the trainer's evaluator; return the path
    of the ``coco_instances_results.json`` it writes."""
    model = load_inference_model(cfg, weights)
    evaluator = RetinaFocalTrainer.build_evaluator(cfg, dataset_name, output_folder=eval_dir)
    inference_on_dataset(model, RetinaFocalTrainer.build_test_loader(cfg, dataset_name), evaluator)
    return os.path.join(eval_dir, "coco_instances_results.json")


def error_analysis(dataset_name: str, results_json: str, score_thresh: float, output_dir: str, prefix: str) -> Dict:
    """Print the tables and write the two PNGs; return AP rows, summary and PNG paths."""
    results = load_coco_results(results_json)
    class_names = MetadataCatalog.get(dataset_name).thing_classes
    coco_eval = coco_evaluation(dataset_name, results)
    ap_rows = per_class_ap(coco_eval, class_names)
    print(f"{dataset_name}: {len(results)} detections from {results_json}")
    print(f"\nAP@[.5:.95] per class, worst first (overall AP {coco_eval.stats[0] * 100:.1f}):")
    for name, ap in ap_rows:
        print(f"  {name:<14}{ap:6.1f}")
    summary = match_detections(
        ground_truth_boxes(dataset_name), detections_from_coco_results(results, dataset_name), len(class_names),
        score_thresh,
    )
    print(f"\nAt score >= {score_thresh:g} (rows: ground truth, columns: detections):")
    print(confusion_table(summary, class_names))
    curves = {iou: precision_recall(coco_eval, iou) for iou in PR_IOUS}
    title = f"{dataset_name}: {os.path.basename(results_json)}"
    paths = [
        plot_precision_recall(curves, class_names, dict(ap_rows), os.path.join(output_dir, f"{prefix}pr_curves.png"),
                              f"Precision–recall, {title}"),
        plot_confusion(summary, class_names, os.path.join(output_dir, f"{prefix}confusion.png"),
                       f"{title}, score ≥ {score_thresh:g}, match IoU ≥ 0.5"),
    ]
    print("\n" + "\n".join(f"wrote {p}" for p in paths))
    return {"per_class_ap": ap_rows, "summary": summary, "paths": paths}


def add_results_arguments(parser: argparse.ArgumentParser, eval_dir: str) -> None:
    """The arguments that name a dataset's detections: ``--config-file``, ``--results`` (a COCO
    results JSON) or ``--weights`` (evaluated first, into ``--eval-dir``), ``--dataset``."""
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="COCO results JSON (coco_instances_results.json)")
    source.add_argument("--weights", help="checkpoint to run on the dataset first")
    parser.add_argument("--dataset", default="", help="registered dataset or coco:/voc:/csv: spec (default DATASETS.TEST[0])")
    parser.add_argument("--eval-dir", default=eval_dir, help="with --weights: evaluator output")


def dataset_and_results(args) -> Tuple[str, str]:
    """(dataset name, results JSON) of :func:`add_results_arguments`'s ``args``: the dataset
    registered (a coco:/voc:/csv: spec given to ``--dataset``), ``--weights`` evaluated on it."""
    cfg = load_config(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    register_config_datasets(cfg, [dataset])
    return dataset, args.results or run_model(cfg, args.weights, dataset, args.eval_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_arguments(parser, eval_dir="output/error_analysis")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="for the confusion matrix and FP types")
    parser.add_argument("--output-dir", default="output/error_analysis", help="where the PNGs go")
    parser.add_argument("--prefix", default="diagnostics_", help="PNG file name prefix")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv: Sequence[str] = None) -> Dict:
    args = build_parser().parse_args(argv)
    dataset, results = dataset_and_results(args)
    return error_analysis(dataset, results, args.score_thresh, args.output_dir, args.prefix)


if __name__ == "__main__":
    main()
