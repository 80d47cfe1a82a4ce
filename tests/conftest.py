"""Shared helpers: small configs, synthetic instances, a dataset root in a temp dir."""
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import retina_focal  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-RetinaFocal.yaml")


def small_cfg(*opts):
    """Base-RetinaFocal with a ResNet-18, 64-channel FPN, 3 classes, on the CPU; then ``opts``."""
    cfg = get_cfg()
    retina_focal.add_retina_focal_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.FPN.OUT_CHANNELS", 64,
            "MODEL.RETINANET.NUM_CLASSES", 3,
        ]
        + list(opts)
    )
    return cfg


def make_instances(boxes, classes, image_size=(128, 128)) -> Instances:
    """Ground truth for one image: XYXY ``boxes`` (list of 4-lists) and class ids."""
    return Instances(
        image_size,
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        gt_classes=torch.tensor(classes, dtype=torch.int64),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def dataset_root(tmp_path_factory):
    """Generated datasets go to a temp dir, never into the checkout."""
    root = str(tmp_path_factory.mktemp("datasets"))
    os.environ["RETINA_FOCAL_DATASETS"] = root
    return root
