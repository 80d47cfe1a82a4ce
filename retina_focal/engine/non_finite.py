"""A NaN or infinite loss explained: what went into the failed step (images, loss per FPN
level, gradient norm, LR) written beside the checkpoints, and a message that says how to resume."""
import logging
import math
from typing import Dict, List, Optional

import torch

from retina_focal.utils.comm import unwrap_model

__all__ = ["NonFiniteLossError", "non_finite_loss_message", "non_finite_loss_report"]




logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss, with the context needed to debug and resume (see the message)."""


def non_finite_loss_report(model, data_loader, optimizer) -> Dict:
    """What went into the failed step: image ids, loss per FPN level, gradient norm, LR.

    The loss per level is recomputed on the step's batch (when the loader recorded it) in
    eval mode, so no collective op runs while other ranks may be gone.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    report = {
        "learning_rate": [group["lr"] for group in optimizer.param_groups],
        "grad_norm": float(torch.nn.utils.get_total_norm(grads)) if grads else None,
        "images": None,
        "loss_per_level": None,
    }
    batch = getattr(data_loader, "last_batch", None)
    if batch is not None:
        report["images"] = [{"image_id": x.get("image_id"), "file_name": x.get("file_name")} for x in batch]
        report["loss_per_level"] = _loss_per_level_in_eval_mode(unwrap_model(model), batch)
    return report


def _loss_per_level_in_eval_mode(model, batch: List[Dict]) -> Optional[Dict[str, Dict[str, float]]]:
    if not hasattr(model, "loss_per_level"):
        return None
    was_training = model.training
    model.eval()
    try:
        return model.loss_per_level(batch)
    finally:
        model.train(was_training)


def non_finite_loss_message(report: Dict, path: str) -> str:
    bad_levels = {
        term: [level for level, v in levels.items() if not math.isfinite(v)]
        for term, levels in (report["loss_per_level"] or {}).items()
    }
    terms = ", ".join(f"{t} (levels {', '.join(ls)})" for t, ls in bad_levels.items() if ls) or "see the loss_dict above"
    checkpoint = report["last_checkpoint"]
    resume = (
        f"the last checkpoint is {checkpoint}: fix the cause (e.g. a lower SOLVER.BASE_LR, a longer "
        "SOLVER.WARMUP_ITERS, or the images listed in the report) and rerun with --resume"
        if checkpoint
        else "no checkpoint was written yet: the run has to start again"
    )
    return (
        f"Non-finite loss at iteration {report['iteration']}: {terms}; gradient norm "
        f"{report['grad_norm']}, learning rate {report['learning_rate']}. Report: {path}; {resume}."
    )
