"""Diagnostics (docs/diagnostics.md): anchor coverage of a dataset, assignment metrics logged
during training, and error analysis after evaluation. The figures are in
``retina_focal.diagnostics.plots`` (imported on demand: it loads matplotlib)."""
from .anchor_coverage import (
    AnchorCoverage,
    AnchorGrid,
    anchor_config_lines,
    measure_coverage,
    coverage_table,
    propose_anchors,
    with_anchors,
)
from .assignment import log_assignment_metrics
from .error_analysis import (
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
    "log_assignment_metrics",
    "coco_evaluation",
    "confusion_table",
    "detections_from_coco_results",
    "ground_truth_boxes",
    "match_detections",
    "per_class_ap",
    "precision_recall",
]
