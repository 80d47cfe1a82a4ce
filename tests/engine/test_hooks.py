"""Validation-loss and best-checkpoint hooks: placement, state left untouched, a short run."""
import json
import os

import pytest
import torch
from detectron2.engine import hooks
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from retina_focal.data import register_builtin_shapes
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.config.load import load_config
from retina_focal.engine.hooks import ValidationLoss, insert_diagnostic_hooks, validation_losses
from retina_focal.utils.testing import synthetic_batch
from tests.conftest import REPO, small_cfg

DEMO = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")


def test_validation_losses_equal_a_training_forward_and_leave_the_model_as_it_was():
    cfg = small_cfg()
    model = build_model(cfg)
    batch = synthetic_batch(2, 128, num_classes=3)
    model.loss_normalizer.fill_(37.0)
    losses = validation_losses(model, [batch])
    assert model.loss_normalizer.item() == 37.0 and model.training
    # independent: the model's own training forward with a per-batch normalizer (momentum 0)
    model.loss_normalizer_momentum = 0.0
    with EventStorage(), torch.no_grad():
        expected = model(batch)
    assert losses["val_loss_cls"] == pytest.approx(expected["loss_cls"].item(), rel=1e-5)
    assert losses["val_loss_box_reg"] == pytest.approx(expected["loss_box_reg"].item(), rel=1e-5)
    assert losses["val_total_loss"] == pytest.approx(losses["val_loss_cls"] + losses["val_loss_box_reg"])


@pytest.mark.slow
def test_validation_losses_average_over_batches():
    model = build_model(small_cfg())
    a, b = synthetic_batch(1, 128, 3, seed=1), synthetic_batch(1, 128, 3, seed=2)
    both = validation_losses(model, [a, b])
    each = [validation_losses(model, [x]) for x in (a, b)]
    assert both["val_loss_cls"] == pytest.approx((each[0]["val_loss_cls"] + each[1]["val_loss_cls"]) / 2)


def test_hooks_are_off_by_default_and_placed_around_the_eval_hook():
    cfg = small_cfg()
    base = [hooks.IterationTimer(), hooks.EvalHook(0, lambda: {}), hooks.PeriodicWriter([])]
    assert insert_diagnostic_hooks(cfg, base, checkpointer=None) == base
    cfg.merge_from_list([
        "TEST.VAL_LOSS_PERIOD", 5, "SOLVER.BEST_CHECKPOINT_METRIC", "bbox/AP", "DATALOADER.NUM_WORKERS", 0,
        "DATASETS.TEST", ("retina_focal_shapes_tiny_val",),
    ])
    register_builtin_shapes()
    placed = insert_diagnostic_hooks(cfg, base, checkpointer=None)
    assert [type(h) for h in placed] == [
        hooks.IterationTimer, ValidationLoss, hooks.EvalHook, hooks.BestCheckpointer, hooks.PeriodicWriter
    ]


@pytest.mark.slow
def test_short_run_logs_validation_losses_and_assignment_metrics_and_keeps_the_best(tmp_path):
    cfg = load_config(DEMO, [
        "OUTPUT_DIR", str(tmp_path), "SEED", 0,
        "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", ("retina_focal_shapes_tiny_val",),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 4, "SOLVER.LOG_PERIOD", 1,
        "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 2,
        "TEST.VAL_LOSS_PERIOD", 2, "TEST.VAL_LOSS_NUM_IMAGES", 4,
        "SOLVER.BEST_CHECKPOINT_METRIC", "val_total_loss", "SOLVER.BEST_CHECKPOINT_MODE", "min",
    ])
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    val_iters = [r["iteration"] for r in rows if "val_total_loss" in r]
    assert val_iters == [1, 3]  # after iterations 2 and 4 (the last)
    assert all(f"assign/fg_anchors_per_image/{n}" in rows[0] for n in ("p3", "p4", "p5", "p6", "p7"))
    assert "assign/gt_with_fg_anchor" in rows[0] and "assign/matched_gt_best_iou" in rows[0]
    best = torch.load(tmp_path / "model_best.pth", map_location="cpu", weights_only=False)
    losses = {r["iteration"]: r["val_total_loss"] for r in rows if "val_total_loss" in r}
    assert best["iteration"] == min(losses, key=losses.get)
