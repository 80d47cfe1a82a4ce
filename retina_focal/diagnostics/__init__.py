"""Diagnostics (docs/diagnostics.md): anchor coverage of a dataset and assignment metrics
logged during training. The figures are in ``retina_focal.diagnostics.plots`` (imported on
demand: it loads matplotlib)."""
from .anchor_coverage import (
    AnchorCoverage,
    AnchorGrid,
    anchor_config_lines,
    coverage_table,
    measure_coverage,
    propose_anchors,
    with_anchors,
)
from .assignment import gt_assignment, log_assignment_metrics

__all__ = [
    "AnchorCoverage",
    "AnchorGrid",
    "anchor_config_lines",
    "coverage_table",
    "measure_coverage",
    "propose_anchors",
    "with_anchors",
    "gt_assignment",
    "log_assignment_metrics",
]
