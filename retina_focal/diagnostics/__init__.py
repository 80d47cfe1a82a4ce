"""Diagnostics (docs/diagnostics.md): assignment metrics logged during training."""
from .assignment import gt_assignment, log_assignment_metrics

__all__ = ["gt_assignment", "log_assignment_metrics"]
