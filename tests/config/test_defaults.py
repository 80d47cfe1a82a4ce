"""Bad config values fail at build time naming the key; ignored keys get a warning."""
import logging
import os

import pytest

from retina_focal.config.defaults import warn_ignored_settings
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.modeling.matching import EveryGTMatcher
from tests.conftest import REPO, small_cfg


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (["MODEL.RETINA_FOCAL.HEAD_NAME", "NoSuchHead"], KeyError, r"HEAD_NAME='NoSuchHead'.*RetinaFocalHead"),
        (["MODEL.RETINA_FOCAL.LOSS.NAME", "NoSuchLoss"], KeyError, r"LOSS.NAME='NoSuchLoss'.*FocalLoss"),
        (["MODEL.RETINANET.IOU_THRESHOLDS", [0.5, 0.4]], ValueError, r"IOU_THRESHOLDS.*\[0.5, 0.4\]"),
        (["MODEL.RETINANET.IOU_THRESHOLDS", [0.4, 1.5]], ValueError, r"IOU_THRESHOLDS.*1.5"),
        (["MODEL.RETINANET.IOU_LABELS", [0, 1]], ValueError, r"IOU_LABELS"),
        (["MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]]], ValueError, r"ANCHOR_GENERATOR.SIZES has 2 lists.*5"),
        (["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, -1.0]]], ValueError, r"ASPECT_RATIOS.*positive"),
        (["MODEL.ANCHOR_GENERATOR.SIZES", [[0]]], ValueError, r"SIZES.*positive"),
        (["MODEL.RETINANET.FOCAL_LOSS_GAMMA", -1.0], ValueError, r"FOCAL_LOSS_GAMMA.*-1.0"),
        (["MODEL.RETINANET.FOCAL_LOSS_ALPHA", 1.5], ValueError, r"FOCAL_LOSS_ALPHA.*negative to turn.*1.5"),
        (["MODEL.RETINANET.PRIOR_PROB", 1.0], ValueError, r"PRIOR_PROB.*\(0, 1\)"),
        (["MODEL.RETINANET.NUM_CLASSES", 0], ValueError, r"NUM_CLASSES must be >= 1, got 0"),
        (["MODEL.RETINANET.IN_FEATURES", ["p3", "p9"]], ValueError, r"IN_FEATURES names \['p9'\]"),
    ],
)
def test_bad_values_fail_at_build_time_naming_the_key(opts, error, message):
    with pytest.raises(error, match=message):
        RetinaFocalTrainer.build_model(small_cfg(*opts))


def test_negative_alpha_turns_weighting_off_as_documented():
    model = RetinaFocalTrainer.build_model(small_cfg("MODEL.RETINANET.FOCAL_LOSS_ALPHA", -1.0))
    assert model.cls_loss.alpha == -1.0


@pytest.mark.parametrize(
    "opts, expected",
    [
        (["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.5], "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5 has no effect on RetinaFocal; set MODEL.RETINANET.SCORE_THRESH_TEST (now 0.05)"),
        (["MODEL.ROI_HEADS.NUM_CLASSES", 7], "MODEL.ROI_HEADS.NUM_CLASSES=7 has no effect on RetinaFocal; set MODEL.RETINANET.NUM_CLASSES (now 3)"),
        (["MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.3], "set MODEL.RETINANET.NMS_THRESH_TEST"),
        (["MODEL.MASK_ON", True], "MODEL.MASK_ON=True has no effect: RetinaFocal predicts boxes only"),
    ],
)
def test_settings_without_effect_get_a_warning_naming_the_key_to_use(opts, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="retina_focal.config.defaults"):
        warn_ignored_settings(small_cfg(*opts))
    assert expected in caplog.text


def test_no_warning_for_untouched_or_consistent_settings(caplog):
    cfg = small_cfg("MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05)
    with caplog.at_level(logging.WARNING, logger="retina_focal.config.defaults"):
        warn_ignored_settings(cfg)
    assert [r.message for r in caplog.records if r.name == "retina_focal.config.defaults"] == []


def test_match_every_gt_selects_the_repairing_matcher():
    assert not isinstance(RetinaFocalTrainer.build_model(small_cfg()).anchor_matcher, EveryGTMatcher)
    model = RetinaFocalTrainer.build_model(small_cfg("MODEL.RETINA_FOCAL.MATCH_EVERY_GT", True))
    assert isinstance(model.anchor_matcher, EveryGTMatcher)


def test_class_balanced_alpha_that_reaches_0_or_1_is_warned(caplog):
    """Counts [300 x 4, 2] gave α = [0.009.., 1.0]: the rare class's negatives weighed 0, logged
    but not warned."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from retina_focal.config.load import _resolve_class_balanced_alpha

    name = "config_long_tail"
    records = [{"file_name": f"{i}.png", "image_id": i, "height": 8, "width": 8,
                "annotations": [{"bbox": [0, 0, 4, 4], "bbox_mode": 0, "category_id": k} for k in range(4)]} for i in range(300)]
    records[0]["annotations"] += [{"bbox": [0, 0, 4, 4], "bbox_mode": 0, "category_id": 4}] * 2
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=list("abcde"))
    cfg = small_cfg("DATASETS.TRAIN", (name,), "MODEL.RETINANET.NUM_CLASSES", 5, "MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA", 0.999)
    cfg.defrost()
    with caplog.at_level(logging.WARNING, logger="retina_focal.config.load"):
        _resolve_class_balanced_alpha(cfg)
    assert cfg.MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA[4] == 1.0
    assert "class 4 (2 boxes): α 1.0" in caplog.text and "negatives weigh 0" in caplog.text


def test_tta_sizes_follow_the_test_size_unless_set():
    """TEST.AUG.ENABLED alone on the 128-px demo evaluated at detectron2's 400-1200 px."""
    from retina_focal.config.load import load_config

    demo = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")
    cfg = load_config(demo, ["TEST.AUG.ENABLED", True])
    assert tuple(cfg.TEST.AUG.MIN_SIZES) == (64, 80, 96, 112, 128, 144, 160, 176, 192) and cfg.TEST.AUG.MAX_SIZE == 384
    kept = load_config(demo, ["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", (100, 128)])
    assert tuple(kept.TEST.AUG.MIN_SIZES) == (100, 128) and kept.TEST.AUG.MAX_SIZE == 4000  # set: kept as given
    coco = load_config(os.path.join(REPO, "configs", "COCO-Detection", "retina_focal_R_50_FPN_1x.yaml"), ["TEST.AUG.ENABLED", True])
    assert tuple(coco.TEST.AUG.MIN_SIZES) == (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)  # 800-px test size: as is
