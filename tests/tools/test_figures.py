"""tools/figures.py: each subcommand writes a real PNG; the curves match the formulas by hand."""
import os

import matplotlib.image
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import REPO, make_instances, small_cfg

from tools import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_OPTS = [
    "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",),
    "DATASETS.TEST", ("retina_focal_shapes_tiny_val",),
    "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128,
    "MODEL.RETINANET.NUM_CLASSES", 5,  # the five shapes
]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _assert_png(path: str, min_kb: float = 20) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > min_kb * 1024
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.std() > 0  # not blank


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A config file for a tiny model on the tiny shapes splits and an (untrained) checkpoint."""
    out = tmp_path_factory.mktemp("figures_run")
    cfg = small_cfg(*TINY_OPTS)
    config_file = str(out / "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    RetinaFocalCheckpointer(RetinaFocalTrainer.build_model(cfg), str(out)).save("model")
    return config_file, str(out / "model.pth")


def test_figure1_gamma0_is_ce_and_focusing_lowers_the_loss():
    p_t = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(figures.focal_loss_of_pt(p_t, 0.0), -np.log(p_t), rtol=1e-9)
    np.testing.assert_allclose(figures.focal_loss_of_pt(p_t, 2.0), -((1 - p_t) ** 2) * np.log(p_t), rtol=1e-9)
    assert (figures.focal_loss_of_pt(p_t, 5.0) < figures.focal_loss_of_pt(p_t, 0.5)).all()


def test_figure5_curves_follow_appendix_a():
    x = np.linspace(-5, 5, 101)
    ce = np.log1p(np.exp(-x))
    curves = figures.figure5_curves(x)
    np.testing.assert_allclose(curves["CE"], ce, rtol=1e-9)
    np.testing.assert_allclose(curves["FL*, γ = 4, β = 0"], np.log1p(np.exp(-4 * x)) / 4, rtol=1e-9)
    np.testing.assert_allclose(curves["FL*, γ = 2, β = 1"], np.log1p(np.exp(-(2 * x + 1))) / 2, rtol=1e-9)
    x_t = torch.as_tensor(x)
    np.testing.assert_allclose(figures.focal_loss_star(x_t, 1.0, 0.0).numpy(), ce, rtol=1e-9)  # γ=1, β=0: CE
    for name in ("FL, γ = 2", "FL*, γ = 2, β = 1", "FL*, γ = 4, β = 0"):
        assert (curves[name][x > 0] < ce[x > 0]).all()  # well-classified examples count less


@pytest.mark.parametrize("command", ["fig1", "fig5"])
def test_loss_curve_commands_write_pngs(tmp_path, command):
    path = figures.main([command, "--output", str(tmp_path / f"{command}.png")])
    _assert_png(path)


def test_loss_cdf_by_hand():
    x, y = figures.loss_cdf(np.array([3.0, 1.0, 0.0, 4.0]))  # sorted 0, 1, 3, 4; sum 8
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(y, [0, 0, 1 / 8, 4 / 8, 1])
    assert figures.hardest_share(x, y, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        figures.loss_cdf(np.zeros(3))


def test_anchor_losses_by_hand():
    logits = torch.tensor([[[1.0, -2.0], [-3.0, 0.5], [4.0, 4.0], [0.2, -1.0]]], dtype=torch.float64)  # (1, 4, 2)
    gt_labels = torch.tensor([[0, 2, -1, 1]])  # positive, background, ignored, positive (K = 2)
    pos_logits, neg_logits = figures.split_logits(logits, gt_labels)
    pos, neg = figures.anchor_focal_losses(pos_logits, neg_logits, gamma=2.0)
    p_pos = _sigmoid(np.array([1.0, -1.0]))  # anchor 0 class 0, anchor 3 class 1
    np.testing.assert_allclose(pos, -((1 - p_pos) ** 2) * np.log(p_pos), rtol=1e-9)
    p_neg = _sigmoid(np.array([-3.0, 0.5]))  # anchor 1, both classes negative
    np.testing.assert_allclose(neg, [np.sum(-(p_neg**2) * np.log(1 - p_neg))], rtol=1e-9)


def test_figure4_command_and_its_curves(tmp_path, tiny_run):
    config_file, weights = tiny_run
    path = figures.main([
        "fig4", "--config-file", config_file, "--weights", weights, "--num-images", "4",
        "--gammas", "0", "2", "--output", str(tmp_path / "fig4.png"),
    ])
    _assert_png(path)

    cfg = figures.load_cfg(config_file)
    model = figures.load_model(cfg, weights)
    pos_logits, neg_logits, used = figures.collect_logits(model, cfg, cfg.DATASETS.TEST[0], num_images=4)
    assert used == 4 and len(pos_logits) > 0 and neg_logits.shape[1] == 5
    data = figures.figure4_data(pos_logits, neg_logits, [0.0, 2.0])
    for kind in ("positive", "negative"):
        for x, y in data[kind].values():
            assert x[-1] == 1.0 and y[-1] == pytest.approx(1.0) and y[0] == 0.0
            assert (np.diff(y) >= 0).all() and (np.diff(x) > 0).all()
        # (1 - p_t)^γ grows with the loss, so γ = 2 concentrates it on the hard samples
        assert (data[kind][2.0][1] <= data[kind][0.0][1] + 1e-9).all()


def test_anchors_command_writes_png(tmp_path, tiny_run):
    config_file, _ = tiny_run
    path = figures.main([
        "anchors", "--config-file", config_file, "--dataset-index", "1", "--output", str(tmp_path / "a.png"),
    ])
    _assert_png(path)


def test_anchor_assignment_marks_the_anchor_equal_to_the_box():
    cfg = small_cfg(*TINY_OPTS)
    model = RetinaFocalTrainer.build_model(cfg).eval()
    anchor = [40.0, 32.0, 72.0, 64.0]  # the 32-px square anchor of P3 centred at (56, 48)
    inputs = {"image": torch.zeros(3, 128, 128), "instances": make_instances([anchor], [2])}
    levels = figures.anchor_assignment(model, inputs)
    assert len(levels) == 5 and len(levels[0]["boxes"]) == 16 * 16 * 9
    p3 = levels[0]
    (exact,) = np.flatnonzero((p3["boxes"] == np.array(anchor, dtype=np.float32)).all(axis=1))
    assert p3["labels"][exact] == 2 and p3["gt_index"][exact] == 0
    fg = p3["labels"] == 2
    assert (p3["gt_index"][fg] == 0).all() and (p3["gt_index"][~fg] == -1).all()


def test_find_dataset_index_by_file_name():
    figures.load_cfg(os.path.join(REPO, "configs", "Base-RetinaFocal.yaml"))  # registers the shapes
    dicts = DatasetCatalog.get("retina_focal_shapes_tiny_train")
    name = os.path.basename(dicts[3]["file_name"])
    assert figures.find_dataset_index("retina_focal_shapes_tiny_train", name) == 3
    with pytest.raises(ValueError, match="annotations"):
        figures.find_dataset_index("retina_focal_shapes_tiny_train", "holiday.jpg")
