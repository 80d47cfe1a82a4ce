"""configs/Ablations: every Table 1 / Table 3 row loads and trains; tools/sweep.py tabulates."""
import csv
import glob
import math
import os
import sys

import pytest
from detectron2.config import CfgNode

from retina_focal.data import register_builtin_shapes
from retina_focal.engine import RetinaFocalTrainer
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import sweep  # noqa: E402

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


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_every_ablation_trains_two_iterations_under_a_budget(path, tmp_path):
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
