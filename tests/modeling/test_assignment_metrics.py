"""The assign/* metrics logged by RetinaFocal.losses every step, and the once-only warning."""
import logging
from contextlib import contextmanager

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from retina_focal.utils.testing import random_images
from tests.conftest import make_instances, small_cfg

LEVELS = ("p3", "p4", "p5", "p6", "p7")
WARNING = "Anchor coverage: in the batch of iteration"


@contextmanager
def _warnings_of_retina_focal(caplog):
    """caplog on the "retina_focal" logger itself (setup_logger turns its propagation off)."""
    logger = logging.getLogger("retina_focal")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # each record once
    with caplog.at_level(logging.WARNING, logger="retina_focal"):
        try:
            yield
        finally:
            logger.removeHandler(caplog.handler)
            logger.propagate = propagate


def _batch(boxes_per_image):
    images = random_images([(128, 128)] * len(boxes_per_image))
    return [
        {"image": im, "instances": make_instances(boxes, [i % 3 for i in range(len(boxes))])}
        for im, boxes in zip(images, boxes_per_image)
    ]


def _train_step(model, batch, iteration=0):
    with EventStorage(iteration) as storage:
        losses = model(batch)
        return losses, {k: v for k, (v, _) in storage.latest().items()}


def _reference_anchors(cfg):
    """detectron2's own anchors for a 128-px input (P3-P7: strides 8-128), independent of the model."""
    a = cfg.MODEL.ANCHOR_GENERATOR
    generator = DefaultAnchorGenerator(
        sizes=a.SIZES, aspect_ratios=a.ASPECT_RATIOS, strides=[8, 16, 32, 64, 128], offset=a.OFFSET
    )
    features = [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    return generator(features)


def test_metrics_exist_after_a_step_and_match_an_independent_count():
    cfg = small_cfg()
    model = build_model(cfg)
    boxes = [[[10, 12, 60, 70], [70, 20, 120, 50], [30, 80, 36, 86]], [[5, 5, 120, 110]]]
    _, metrics = _train_step(model, _batch(boxes))
    per_level = [metrics[f"assign/fg_anchors_per_image/{name}"] for name in LEVELS]
    assert sum(per_level) == pytest.approx(metrics["num_pos_anchors"])
    anchors = Boxes.cat(_reference_anchors(cfg))
    best = torch.cat([pairwise_iou(Boxes(torch.tensor(b, dtype=torch.float32)), anchors).max(dim=1).values for b in boxes])
    # the 6-px box stays below IoU 0.5 but keeps its best anchor (low-quality rule)
    assert (best >= 0.5).float().mean().item() == pytest.approx(3 / 4)
    assert metrics["assign/gt_best_iou_above_fg"] == pytest.approx(3 / 4)
    assert metrics["assign/gt_with_fg_anchor"] == 1.0
    assert metrics["assign/matched_gt_best_iou"] == pytest.approx(best.mean().item(), rel=1e-6)


def test_anchor_counts_add_up_and_are_written_unsmoothed():
    """all = fg + bg + ignored per image; the three are single-batch values in metrics.json."""
    cfg = small_cfg()
    model = build_model(cfg)
    boxes = [[[10, 12, 60, 70], [70, 20, 120, 50]], []]
    with EventStorage(0) as storage:
        assignment = model.label_anchors(_reference_anchors(cfg), [b["instances"] for b in _batch(boxes)])
        model(_batch(boxes))
        hints = storage.smoothing_hints()
        metrics = {k: v for k, (v, _) in storage.latest().items()}
    labels = assignment.labels  # (N, R)
    assert metrics["assign/anchors_per_image"] == labels.shape[1] == 3069
    assert metrics["assign/fg_anchors_per_image/all"] == assignment.foreground.sum().item() / 2
    assert metrics["assign/bg_anchors_per_image"] == (labels == cfg.MODEL.RETINANET.NUM_CLASSES).sum().item() / 2
    ignored = (labels == -1).sum().item() / 2
    total = metrics["assign/fg_anchors_per_image/all"] + metrics["assign/bg_anchors_per_image"] + ignored
    assert total == 3069 and ignored > 0
    names = ("assign/anchors_per_image", "assign/fg_anchors_per_image/all", "assign/bg_anchors_per_image")
    assert not any(hints[n] for n in names) and hints["assign/fg_anchors_per_image/p3"]


def test_image_without_boxes_logs_levels_only():
    model = build_model(small_cfg())
    _, metrics = _train_step(model, _batch([[]]))
    assert all(metrics[f"assign/fg_anchors_per_image/{n}"] == 0 for n in LEVELS)
    assert "assign/gt_with_fg_anchor" not in metrics


def test_tiny_boxes_warn_once_and_large_boxes_do_not(caplog):
    model = build_model(small_cfg())
    large = [[[10, 10, 60, 60], [64, 64, 120, 120]]]
    tiny = [[[10, 10, 16, 16], [40, 40, 46, 47], [80, 20, 86, 25], [100, 100, 107, 106]]]
    with _warnings_of_retina_focal(caplog):
        _train_step(model, _batch(large), iteration=0)
        assert WARNING not in caplog.text
        _train_step(model, _batch(tiny), iteration=1)
        _train_step(model, _batch(tiny), iteration=2)
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == 1
    assert "iteration 1, 4 of 4 ground-truth boxes (100%) have no anchor with IoU >= 0.5" in warnings[0]
    assert "tools/anchor_stats.py" in warnings[0] and "UNMATCHED_GT_WARN_FRACTION" in warnings[0]


def test_warning_threshold_is_a_config_key(caplog):
    model = build_model(small_cfg("MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION", 1.0))
    with _warnings_of_retina_focal(caplog):
        _train_step(model, _batch([[[10, 10, 16, 16]]]))
    assert WARNING not in caplog.text


def test_training_losses_do_not_change():
    batch = _batch([[[10, 12, 60, 70], [30, 80, 36, 86]]])
    model = build_model(small_cfg())
    losses, _ = _train_step(model, batch)
    # the same computation without the metrics: label, then the loss terms with the normalizer
    model.loss_normalizer.fill_(100.0)
    anchors, logits, deltas, assignment = model.labelled_predictions(batch)
    num_fg = assignment.foreground.sum().item()
    normalizer = 0.9 * 100.0 + 0.1 * num_fg
    expected = model.loss_terms(
        Boxes.cat(anchors).tensor, torch.cat(logits, 1), torch.cat(deltas, 1), assignment, normalizer
    )
    for name, value in expected.items():
        assert torch.equal(losses[name], value), name
