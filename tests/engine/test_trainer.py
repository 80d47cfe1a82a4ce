"""RetinaFocalTrainer in-process: non-finite loss report, linear LR/batch rescaling."""
import glob
import json
import logging
import os

import pytest
from detectron2.engine import hooks
from detectron2.utils.events import get_event_storage

from retina_focal.engine.non_finite import NonFiniteLossError
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.config.load import load_config
from tests.conftest import REPO

DEMO = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")
COCO_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "COCO-Detection", "*.yaml")))


def test_non_finite_loss_names_iteration_term_levels_and_checkpoint(tmp_path):
    cfg = load_config(DEMO, [
        "OUTPUT_DIR", str(tmp_path),
        "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
    ])
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    focal_loss = trainer.model.cls_loss.forward

    def nan_from_iteration_3(*args, **kwargs):
        loss = focal_loss(*args, **kwargs)
        return loss * float("nan") if get_event_storage().iter >= 3 else loss

    trainer.model.cls_loss.forward = nan_from_iteration_3
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    report_path = os.path.join(str(tmp_path), "non_finite_loss_iter_0000003.json")
    assert "Non-finite loss at iteration 3: loss_cls (levels p3, p4, p5, p6, p7)" in message
    assert os.path.join(str(tmp_path), "model_0000001.pth") in message and "--resume" in message
    assert report_path in message
    with open(report_path) as f:
        report = json.load(f)
    assert report["iteration"] == 3
    assert len(report["images"]) == 2 and all(x["image_id"] is not None for x in report["images"])
    assert set(report["loss_per_level"]) == {"loss_cls", "loss_box_reg"}
    assert set(report["loss_per_level"]["loss_box_reg"]) == {"p3", "p4", "p5", "p6", "p7"}
    assert report["learning_rate"] and report["grad_norm"] is not None


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("num_gpus", [1, 2, 8, 16])
def test_fewer_gpus_scale_lr_batch_and_schedule_linearly(path, num_gpus, caplog):
    cfg = load_config(path)
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
    with caplog.at_level(logging.INFO):
        scaled = RetinaFocalTrainer.auto_scale_workers(cfg, num_gpus)
    k = num_gpus / 8
    assert scaled.SOLVER.IMS_PER_BATCH == 16 * k == 2 * num_gpus
    assert scaled.SOLVER.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR * k)
    assert scaled.SOLVER.MAX_ITER == round(cfg.SOLVER.MAX_ITER / k)
    assert scaled.SOLVER.STEPS == tuple(round(s / k) for s in cfg.SOLVER.STEPS)
    assert scaled.SOLVER.WARMUP_ITERS == round(cfg.SOLVER.WARMUP_ITERS / k)
    # the product LR x iterations (the total step budget) does not change
    assert scaled.SOLVER.BASE_LR * scaled.SOLVER.MAX_ITER == pytest.approx(cfg.SOLVER.BASE_LR * cfg.SOLVER.MAX_ITER, rel=1e-4)
    if num_gpus != 8:
        assert f"Auto-scaling the config to batch_size={2 * num_gpus}" in caplog.text


def test_demo_config_is_not_rescaled():
    cfg = load_config(DEMO)
    assert RetinaFocalTrainer.auto_scale_workers(cfg, 2).SOLVER.BASE_LR == cfg.SOLVER.BASE_LR


@pytest.mark.slow
def test_log_period_is_the_writer_hooks_and_the_writers_are_built_once(tmp_path):
    cfg = load_config(DEMO, [
        "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 4, "SOLVER.LOG_PERIOD", 2,
    ])
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    (writer,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
    assert writer._period == 2
    trainer.train()
    assert len(glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))) == 1  # one TensorBoard writer
    with open(os.path.join(str(tmp_path), "metrics.json")) as f:
        iterations = [json.loads(line)["iteration"] for line in f]
    assert iterations == [1, 3]  # every LOG_PERIOD iterations (and the last)


def test_a_test_set_of_other_classes_stops_the_run_before_the_first_iteration(tmp_path):
    """With NUM_CLASSES 0 a test set whose classes are in another order used to fail only at the
    first evaluation (400 iterations of the demo lost, and no checkpoint)."""
    from tests.data.test_formats import _csv, _image

    for split, classes in (("train", ["cat", "dog"]), ("test", ["dog", "cat"])):
        folder = tmp_path / split
        _image(folder / "a.png")
        _csv(folder, ["a.png,1,2,30,20,dog"], classes)
    specs = [f"csv:{tmp_path / s / 'ann.csv'}:{tmp_path / s / 'classes.csv'}" for s in ("train", "test")]
    cfg = load_config(DEMO, ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.RETINANET.NUM_CLASSES", 0,
                             "DATASETS.TRAIN", (specs[0],), "DATASETS.TEST", (specs[1],)])
    with pytest.raises(ValueError, match=r"has the classes \['dog', 'cat'\], the training set .* has \['cat', 'dog'\]"):
        RetinaFocalTrainer(cfg)
    assert not os.path.exists(os.path.join(str(tmp_path / "out"), "metrics.json"))
