"""train_net.py end to end on the tiny shapes set: 1 process, --eval-only, 2 CPU processes."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")
TINY = [
    "DATASETS.TRAIN", '("retina_focal_shapes_tiny_train",)',
    "DATASETS.TEST", '("retina_focal_shapes_tiny_val",)',
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
]


def _run(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG] + args,
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return [r["total_loss"] for r in rows if "total_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    log = _run(["--num-gpus", "1", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "6"] + TINY)
    return out, log


def test_single_process_training_writes_checkpoint_and_evaluates(trained):
    out, log = trained
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    losses = _losses(out)
    assert losses and all(math.isfinite(v) for v in losses)


def test_eval_only_loads_weights_and_runs_coco_evaluator(trained, tmp_path):
    out, _ = trained
    log = _run(["--eval-only", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")] + TINY)
    assert "Evaluation results for bbox" in log
    assert os.path.exists(os.path.join(str(tmp_path), "inference", "retina_focal_shapes_tiny_val", "coco_instances_results.json"))


def test_two_cpu_processes_train_with_gloo(tmp_path):
    log = _run(["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "3"] + TINY)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert os.path.exists(os.path.join(str(tmp_path), "log.txt.rank1"))  # a second rank ran
    assert os.path.exists(os.path.join(str(tmp_path), "model_final.pth"))
    assert len(_losses(str(tmp_path))) > 0
