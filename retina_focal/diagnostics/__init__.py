"""Diagnostics (docs/diagnostics.md): anchor coverage of a dataset and error analysis after
evaluation (the assignment metrics logged during training are the model's:
``retina_focal.modeling.assignment_metrics``). The figures are in
``retina_focal.diagnostics.plots`` (imported on demand: it loads matplotlib)."""
from retina_focal.diagnostics.anchor_coverage import (
    AnchorCoverage,
    AnchorGrid,
    anchor_config_lines,
    coverage_table,
    measure_coverage,
    propose_anchors,
    with_anchors,
)
from retina_focal.diagnostics.error_analysis import (
    coco_evaluation,
    confusion_table,
    detections_from_coco_results,
    ground_truth_boxes,
    match_detections,
    per_class_ap,
    precision_recall,
)

__all__ = [
    "AnchorCoverage",
    "AnchorGrid",
    "anchor_config_lines",
    "measure_coverage",
    "coverage_table",
    "propose_anchors",
    "with_anchors",
    "coco_evaluation",
    "confusion_table",
    "detections_from_coco_results",
    "ground_truth_boxes",
    "match_detections",
    "per_class_ap",
    "precision_recall",
]
