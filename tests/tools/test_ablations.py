"""configs/Ablations: every Table 1 / Table 3 row loads and trains; tools/sweep.py tabulates."""
import csv
import glob
import math
import os
import re

import pytest
from detectron2.config import CfgNode

from retina_focal.data import register_builtin_shapes
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import REPO

from tools import sweep

ABLATIONS_DIR = os.path.join(REPO, "configs", "Ablations")
ABLATIONS = sorted(p for p in glob.glob(os.path.join(ABLATIONS_DIR, "*.yaml")) if not os.path.basename(p).startswith("Base-"))
SHAPES_BUDGET = os.path.join(ABLATIONS_DIR, "budgets", "shapes_cpu.yaml")
TINY = [
    "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", ("retina_focal_shapes_tiny_val",),
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 1, "DATALOADER.NUM_WORKERS", 0,
]


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _lookup(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_paper_row_has_a_config_and_every_config_a_paper_row():
    with open(sweep.PAPER_RESULTS) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["config"] for r in rows) == sorted(os.path.basename(p) for p in ABLATIONS)
    counts = {t: sum(r["table"] == t for r in rows) for t in ("1a", "1b", "1c", "1d", "3", "1e", "extra")}
    assert counts == {"1a": 7, "1b": 7, "1c": 7, "1d": 10, "3": 2, "1e": 10, "extra": 2}


def _paper_rows():
    with open(sweep.PAPER_RESULTS) as f:
        return {r["config"]: r["row"] for r in csv.DictReader(f)}


def _fraction(digits: str) -> float:
    """"75" -> 0.75, "999" -> 0.999 (how the names and rows write α)."""
    return float("0." + digits)


# What each row of the paper's tables varies, read from the paper_results.csv row text and,
# independently, from the file name: {key: value} that the config must set.
def _expected_from_row(row: str):
    if m := re.fullmatch(r"CE, α = \.(\d+)", row):
        return {"LOSS": "FocalLoss", "GAMMA": 0.0, "ALPHA": _fraction(m[1])}
    if m := re.fullmatch(r"FL, γ = ([\d.]+), α = \.(\d+)", row):
        return {"LOSS": "FocalLoss", "GAMMA": float(m[1]), "ALPHA": _fraction(m[2])}
    if m := re.fullmatch(r"(\d) scale\(s\) × (\d) ratio\(s\)", row):
        return {"SCALES": int(m[1]), "RATIOS": int(m[2])}
    if m := re.fullmatch(r"OHEM( 1:3)?, batch (\d+), NMS ([\d.]+)", row):
        ratio = {"FRACTION": 0.25, "RULE": "ssd"} if m[1] else {"FRACTION": -1.0}
        return {"LOSS": "OHEMLoss", "DEPTH": 101, "BATCH": int(m[2]), "NMS": float(m[3]), **ratio}
    if row == "FL (ResNet-101)":
        return {"LOSS": "FocalLoss", "DEPTH": 101, "GAMMA": 2.0, "ALPHA": 0.25}
    if m := re.fullmatch(r"R-(\d+), (\d+) px", row):
        return {"DEPTH": int(m[1]), "SIZE": int(m[2])}
    if m := re.fullmatch(r"FL\*, γ = (\d), β = (\d)", row):
        return {"LOSS": "FocalLossStar", "GAMMA": float(m[1]), "BETA": float(m[2])}
    if m := re.fullmatch(r"GN head, (GIoU|smooth L1) box loss", row):
        return {"NORM": "GN", "BOX_LOSS": m[1].lower().replace(" ", "_")}
    raise AssertionError(f"no rule for the paper row {row!r}")


def _expected_from_name(name: str):
    if m := re.fullmatch(r"table1a_ce_alpha_(\d+)\.yaml", name):
        return {"LOSS": "FocalLoss", "GAMMA": 0.0, "ALPHA": _fraction(m[1])}
    if m := re.fullmatch(r"table1b_fl_gamma_(\d+)(?:p(\d+))?_alpha_(\d+)\.yaml", name):
        return {"LOSS": "FocalLoss", "GAMMA": float(f"{m[1]}.{m[2] or 0}"), "ALPHA": _fraction(m[3])}
    if m := re.fullmatch(r"table1c_anchors_(\d)scales_(\d)ratios\.yaml", name):
        return {"SCALES": int(m[1]), "RATIOS": int(m[2])}
    if m := re.fullmatch(r"table1d_ohem_(1to3_)?batch(\d+)_nms0(\d)\.yaml", name):
        ratio = {"FRACTION": 0.25, "RULE": "ssd"} if m[1] else {"FRACTION": -1.0}
        return {"LOSS": "OHEMLoss", "DEPTH": 101, "BATCH": int(m[2]), "NMS": float(f"0.{m[3]}"), **ratio}
    if name == "table1d_fl.yaml":
        return {"LOSS": "FocalLoss", "DEPTH": 101, "GAMMA": 2.0, "ALPHA": 0.25}
    if m := re.fullmatch(r"table1e_R_(\d+)_(\d+)\.yaml", name):
        return {"DEPTH": int(m[1]), "SIZE": int(m[2])}
    if m := re.fullmatch(r"table3_fl_star_gamma_(\d)_beta_(\d)\.yaml", name):
        return {"LOSS": "FocalLossStar", "GAMMA": float(m[1]), "BETA": float(m[2])}
    if m := re.fullmatch(r"extra_gn_head_box_loss_(giou|smooth_l1)\.yaml", name):
        return {"NORM": "GN", "BOX_LOSS": m[1]}
    raise AssertionError(f"no rule for the file name {name!r}")


def _values(cfg):
    """The config's values of every quantity a table row can vary."""
    loss, sizes = cfg.MODEL.RETINA_FOCAL.LOSS, cfg.MODEL.ANCHOR_GENERATOR.SIZES
    scales = {len(level) for level in sizes}
    return {
        "LOSS": loss.NAME, "GAMMA": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA, "ALPHA": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
        "BETA": loss.BETA, "SCALES": scales.pop() if len(scales) == 1 else scales,
        "RATIOS": len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]), "DEPTH": cfg.MODEL.RESNETS.DEPTH,
        "BATCH": loss.OHEM_BATCH_SIZE, "NMS": loss.OHEM_NMS_THRESH, "FRACTION": loss.OHEM_POSITIVE_FRACTION,
        "RULE": loss.OHEM_RATIO_RULE, "SIZE": cfg.INPUT.MIN_SIZE_TEST, "NORM": cfg.MODEL.RETINANET.NORM,
        "BOX_LOSS": cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE,
    }


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_each_config_sets_what_its_name_and_its_paper_row_say(path):
    name = os.path.basename(path)
    from_row, from_name = _expected_from_row(_paper_rows()[name]), _expected_from_name(name)
    assert from_row == from_name
    cfg = sweep.sweep_config(path)
    values = _values(cfg)
    assert {k: values[k] for k in from_row} == from_row
    if "SIZE" in from_row:  # train and test at the row's scale
        assert cfg.INPUT.MIN_SIZE_TRAIN == (from_row["SIZE"],)
    if "SCALES" in from_row:  # §4's octave scheme with n scales per octave: 2^(k/n)
        n = from_row["SCALES"]
        assert all(level == pytest.approx([level[0] * 2 ** (k / n) for k in range(n)]) for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES)


# One config per distinct code path (loss and its options, anchors per location, head norm
# and box loss, image scale); the others differ from one of these in numbers only.
TRAINED = [
    "table1a_ce_alpha_75.yaml",  # γ = 0: α-balanced CE through the fused focal loss
    "table1b_fl_gamma_0p5_alpha_50.yaml",  # γ < 1 (pow of a fraction)
    "table1c_anchors_1scales_1ratios.yaml",  # A = 1
    "table1c_anchors_4scales_3ratios.yaml",  # A = 12
    "table1d_ohem_batch128_nms05.yaml",  # OHEM
    "table1d_ohem_1to3_batch128_nms05.yaml",  # OHEM 1:3 (SSD rule)
    "table1e_R_50_400.yaml",  # another image scale
    "table3_fl_star_gamma_2_beta_1.yaml",  # FL*
    "extra_gn_head_box_loss_giou.yaml",  # GN head, IoU box loss
]


@pytest.mark.parametrize("name", TRAINED)
def test_each_code_path_trains_two_iterations_under_a_budget(name, tmp_path):
    path = os.path.join(ABLATIONS_DIR, name)
    register_builtin_shapes()
    cfg = sweep.sweep_config(path, SHAPES_BUDGET, TINY + ["DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path)])
    for key, value in _flatten(sweep.own_keys(path)):  # the budget never overrides what is studied
        expected = CfgNode._decode_cfg_value(value)  # as yacs reads it: "(400,)" -> (400,)
        assert _lookup(cfg, key) == (tuple(expected) if isinstance(_lookup(cfg, key), tuple) else expected), key
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.SOLVER.MAX_ITER == 2  # ... but sets the scale
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(math.isfinite(v) for v, _ in losses)


def test_without_budget_a_config_is_the_papers_setting():
    cfg = sweep.sweep_config(os.path.join(ABLATIONS_DIR, "table1d_ohem_batch128_nms05.yaml"))
    assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.INPUT.MIN_SIZE_TEST == 600 and cfg.SOLVER.MAX_ITER == 90000
    assert cfg.MODEL.RETINA_FOCAL.LOSS.NAME == "OHEMLoss" and cfg.MODEL.RETINA_FOCAL.LOSS.OHEM_BATCH_SIZE == 128


@pytest.mark.slow
def test_sweep_runs_tabulates_beside_the_paper_and_skips_finished_runs(tmp_path, capsys):
    configs = [os.path.join(ABLATIONS_DIR, n) for n in ("table1a_ce_alpha_75.yaml", "table1b_fl_gamma_2p0_alpha_25.yaml")]
    args = ["--configs"] + configs + ["--budget", SHAPES_BUDGET, "--output-dir", str(tmp_path)] + [str(v) for v in TINY]
    sweep.main(args)
    with open(tmp_path / "results.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"table1a_ce_alpha_75.yaml", "table1b_fl_gamma_2p0_alpha_25.yaml"}
    assert rows["table1b_fl_gamma_2p0_alpha_25.yaml"]["paper AP"] == "34.0"
    assert rows["table1a_ce_alpha_75.yaml"]["row"] == "CE, α = .75"
    assert all(0.0 <= float(r["ours AP"]) <= 100.0 or r["ours AP"] == "nan" for r in rows.values())
    assert float(rows["table1a_ce_alpha_75.yaml"]["ours time_ms"]) > 0
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Made by `python tools/sweep.py --configs") and "| paper AP |" in markdown
    assert "paper APs" not in markdown  # Table 1e columns only where the paper has them
    sweep.main(args)
    assert capsys.readouterr().out.count("finished before, skipped") == 2
