import glob
import math
import os

import pytest
from detectron2.modeling import build_model

import retina_focal
from retina_focal.config.load import load_config
from tests.conftest import REPO

CONFIGS = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
)


def _load(path):
    # configs/Custom/ take their data (and so their number of classes) from the command line
    data = ["DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",)] if path.startswith("configs/Custom") else []
    return load_config(os.path.join(REPO, path), data)


def test_configs_exist():
    assert "configs/Base-RetinaFocal.yaml" in CONFIGS
    assert "configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads_and_builds(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaFocal"
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, retina_focal.RetinaFocal)


def test_base_config_is_the_papers_schedule():
    cfg = _load("configs/Base-RetinaFocal.yaml")
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS)) == (16, 0.01, 90000, (60000, 80000))
    assert (s.WEIGHT_DECAY, s.MOMENTUM) == (0.0001, 0.9)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.MODEL.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]


def test_jitter_configs_are_one_and_a_half_times_longer():
    cfg = _load("configs/COCO-Detection/retina_focal_R_101_FPN_1.5x_jitter.yaml")
    assert cfg.SOLVER.MAX_ITER == 135000 and tuple(cfg.SOLVER.STEPS) == (90000, 120000)
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 640 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 800


def test_add_config_twice_keeps_merged_values():
    cfg = _load("configs/Base-RetinaFocal.yaml")
    cfg.MODEL.RETINA_FOCAL.P6_FROM = "p5"
    retina_focal.add_retina_focal_config(cfg)
    assert cfg.MODEL.RETINA_FOCAL.P6_FROM == "p5"


@pytest.mark.slow
def test_v2_recipe_trains_two_iterations_with_its_switches_on(tmp_path):
    """configs/COCO-Detection/retina_focal_R_50_FPN_v2_3x.yaml (PR #5756's recipe + EMA) on the tiny
    shapes set at small sizes: GN head, gIoU loss, SyncBN backbone, EMA and multi-scale all
    active, two iterations without error and finite losses."""
    from detectron2.layers import FrozenBatchNorm2d
    from torch import nn

    from retina_focal.data import register_builtin_shapes
    from retina_focal.engine.trainer import RetinaFocalTrainer

    register_builtin_shapes()
    cfg = load_config(
        os.path.join(REPO, "configs/COCO-Detection/retina_focal_R_50_FPN_v2_3x.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
         "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", (), "MODEL.RETINANET.NUM_CLASSES", 5,
         "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.REFERENCE_WORLD_SIZE", 0,
         "INPUT.MIN_SIZE_TRAIN", (96, 128), "INPUT.MAX_SIZE_TRAIN", 160, "DATALOADER.NUM_WORKERS", 0],
    )
    assert len(cfg.INPUT.MIN_SIZE_TRAIN) == 2 and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    trainer = RetinaFocalTrainer(cfg)
    model = trainer.model
    assert model.box_reg_loss_type == "giou" and trainer.ema is not None and trainer.ema.decay == 0.9998
    assert any(isinstance(m, nn.GroupNorm) for m in model.head.modules())
    norms = [type(m) for m in model.backbone.bottom_up.res3.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(t is nn.SyncBatchNorm for t in norms)
    assert all(type(m) is FrozenBatchNorm2d for m in model.backbone.bottom_up.stem.modules() if "BatchNorm" in type(m).__name__)
    trainer.train()
    losses = trainer.storage.latest()
    assert trainer.iter == 2 and all(math.isfinite(losses[k][0]) for k in ("loss_cls", "loss_box_reg"))
