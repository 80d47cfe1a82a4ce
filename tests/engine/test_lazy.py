"""LazyConfig (.py) configs: the same model as their .yaml twins, and train_net.py trains and
evaluates with them (retina_focal/engine/lazy.py)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier
from detectron2.utils.events import EventStorage

from retina_focal.data import checked_dataset_dicts
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.config.load import load_config
from retina_focal.evaluation import RetinaFocalCOCOEvaluator
from retina_focal.engine.lazy import is_lazy_config, lazy_setup
from retina_focal.utils.testing import make_detections_nontrivial, paired_detection_rows, synthetic_batch
from tests.conftest import REPO

DEMO = "configs/Shapes-Detection/retina_focal_R_18_FPN_demo"
TWINS = [DEMO, "configs/COCO-Detection/retina_focal_R_50_FPN_1x"]


def _twins(stem):
    """(lazy model, yaml model) of one config, the lazy one holding the yaml one's weights."""
    lazy = instantiate(LazyConfig.load(os.path.join(REPO, stem + ".py")).model)
    cfg = load_config(os.path.join(REPO, stem + ".yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return lazy, build_model(cfg)


@pytest.mark.parametrize("stem", TWINS)
def test_lazy_config_builds_the_yaml_model(stem):
    """Same modules, parameter names and shapes, inference settings, and with the same weights
    the same losses and detections, bit for bit."""
    lazy, twin = _twins(stem)
    assert str(lazy) == str(twin)
    assert lazy.inference_settings == twin.inference_settings
    inputs = synthetic_batch(2, 128, twin.num_classes, seed=3)
    make_detections_nontrivial(twin, inputs)
    lazy.load_state_dict(twin.state_dict(), strict=True)
    with EventStorage():
        losses = [m(inputs) for m in (lazy, twin)]
    assert {k: v.item() for k, v in losses[0].items()} == {k: v.item() for k, v in losses[1].items()}
    lazy.eval(), twin.eval()
    with torch.no_grad():
        outputs = [m([{"image": x["image"]} for x in inputs]) for m in (lazy, twin)]
    for a, b in zip(*outputs):
        rows_a, rows_b = paired_detection_rows(a["instances"], b["instances"])
        assert len(rows_a) > 0 and torch.equal(rows_a, rows_b)


def test_same_seed_same_initial_weights():
    """With the same seed both configs draw the same initial weights (the §4.1 initialization in
    the same order), so a .py and a .yaml run differ only by their data streams."""
    lazy_cfg = LazyConfig.load(os.path.join(REPO, DEMO + ".py"))
    cfg = load_config(os.path.join(REPO, DEMO + ".yaml"))
    torch.manual_seed(1)
    lazy = instantiate(lazy_cfg.model).state_dict()
    torch.manual_seed(1)
    twin = build_model(cfg).state_dict()
    assert all(torch.equal(lazy[k], twin[k]) for k in twin)


@pytest.mark.parametrize("stem", TWINS)
def test_py_configs_check_their_training_data_and_evaluate_as_the_yaml_trainer(stem):
    """The training set goes through the .yaml trainer's checks (checked_dataset_dicts) and
    the evaluator is the .yaml trainer's (RetinaFocalCOCOEvaluator, which notes why AP is NaN)."""
    dataloader = LazyConfig.load(os.path.join(REPO, stem + ".py")).dataloader
    assert dataloader.train.dataset._target_ is checked_dataset_dicts
    assert dataloader.evaluator._target_ is RetinaFocalCOCOEvaluator


def test_only_py_files_are_lazy_configs():
    assert is_lazy_config(DEMO + ".py") and not is_lazy_config(DEMO + ".yaml")


def test_fit_anchors_needs_a_yaml_config():
    args = argparse.Namespace(config_file=os.path.join(REPO, DEMO + ".py"), opts=[], fit_anchors=True)
    with pytest.raises(ValueError, match="--fit-anchors needs a .yaml config"):
        lazy_setup(args)


TINY = [
    "dataloader.train.dataset.names=retina_focal_shapes_tiny_train",
    "dataloader.test.dataset.names=retina_focal_shapes_tiny_val",
    "dataloader.train.total_batch_size=2",
]


def _train_net(args, flags=()):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, DEMO + ".py")]
        + list(flags) + TINY + args,
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_trains_with_amp_resumes_and_evaluates_a_py_config(tmp_path):
    """Two bf16 mixed-precision iterations (train.amp.enabled on a CPU), a checkpoint, COCO
    evaluation at the end, --resume continuing after it, then --eval-only on that checkpoint;
    an empty checkpoint is an error."""
    out = str(tmp_path)
    proc, log = _train_net(["train.max_iter=2", "train.eval_period=2", f"train.output_dir={out}", "train.amp.enabled=True"])
    assert proc.returncode == 0, log[-3000:]
    assert "training under torch.autocast('cpu', torch.bfloat16)" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth")) and "copypaste: AP,AP50" in log
    weights = os.path.join(out, "model_final.pth")
    proc, log = _train_net(["train.max_iter=3", "train.eval_period=0", f"train.output_dir={out}", "train.amp.enabled=True"],
                           flags=["--resume"])
    assert proc.returncode == 0, log[-3000:]
    assert "Starting training from iteration 2" in log  # after the 2 saved iterations
    proc, log = _train_net([f"train.init_checkpoint={weights}", f"train.output_dir={out}/eval"], flags=["--eval-only"])
    assert proc.returncode == 0, log[-3000:]
    assert "copypaste: AP,AP50" in log
    proc, log = _train_net([f"train.output_dir={out}/eval"], flags=["--eval-only"])
    assert proc.returncode != 0 and "evaluates train.init_checkpoint, which is empty" in log


def test_demo_py_config_trains_the_yaml_recipe():
    """The demo's optimizer (every parameter's LR, weight decay, momentum) and LR at every
    iteration equal the .yaml trainer's."""
    lazy_cfg = LazyConfig.load(os.path.join(REPO, DEMO + ".py"))
    lazy, twin = _twins(DEMO)
    lazy_cfg.optimizer.params.model = lazy
    optimizers = {"py": (lazy, instantiate(lazy_cfg.optimizer))}
    cfg = load_config(os.path.join(REPO, DEMO + ".yaml"))
    optimizers["yaml"] = (twin, RetinaFocalTrainer.build_optimizer(cfg, twin))
    groups = {}
    for key, (model, optimizer) in optimizers.items():
        names = {id(p): n for n, p in model.named_parameters()}
        groups[key] = {names[id(p)]: (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"])
                       for g in optimizer.param_groups for p in g["params"]}
    assert len(groups["py"]) == len(list(twin.parameters())) and groups["py"] == groups["yaml"]
    lazy_lr = LRMultiplier(optimizers["py"][1], instantiate(lazy_cfg.lr_multiplier), max_iter=lazy_cfg.train.max_iter)
    yaml_lr = RetinaFocalTrainer.build_lr_scheduler(cfg, optimizers["yaml"][1])
    assert lazy_cfg.train.max_iter == cfg.SOLVER.MAX_ITER
    for _ in range(cfg.SOLVER.MAX_ITER):
        assert lazy_lr.get_last_lr() == pytest.approx(yaml_lr.get_last_lr(), rel=1e-12)
        lazy_lr.step(), yaml_lr.step()
