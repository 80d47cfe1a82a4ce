"""tools/imbalance_study.py: its cells, the configs they train and the report of finished runs."""
import json
import math
import os

import pytest
import torch
from detectron2.modeling import build_model

from retina_focal.data import IMBALANCE_LEVELS, register_builtin_shapes
from tools import imbalance_study as study
from tools import sweep


def test_cells_run_whole_seeds_first_then_ce_alphas_at_the_extremes():
    todo = study.cells([1, 2], [1])
    main = 2 * len(IMBALANCE_LEVELS) * 2
    assert len(todo) == main + 4 and len(set(todo)) == len(todo)
    assert {seed for _, _, seed in todo[: main // 2]} == {1}  # seed 1 everywhere before seed 2
    assert {(lv, c) for lv, c, _ in todo[main:]} == {
        (lv, c) for lv in ("x1", "x22") for c in ("table1a_ce_alpha_50", "table1a_ce_alpha_90")
    }
    assert study.cells([], [1], ["x22"]) == [("x22", c, 1) for c in study.CE_OTHER_ALPHAS]  # each once
    assert study.cells([2], [], ["x4", "x1"]) == [("x1", study.FL, 2), ("x1", study.CE, 2), ("x4", study.FL, 2), ("x4", study.CE, 2)]


@pytest.mark.parametrize("config, gamma, alpha", [(study.FL, 2.0, 0.25), (study.CE, 0.0, 0.75), ("table1a_ce_alpha_90", 0.0, 0.9)])
def test_a_cell_trains_its_loss_on_its_level_with_its_seed_and_the_demo_model(config, gamma, alpha):
    register_builtin_shapes()
    path, opts = study.cell_args("x10", config, 3)
    cfg = sweep.sweep_config(path, study.BUDGET, opts)
    assert cfg.DATASETS.TRAIN == ("retina_focal_shapes_x10_train",) and cfg.DATASETS.TEST == ("retina_focal_shapes_val",)
    assert cfg.SEED == 3 and cfg.SOLVER.MAX_ITER == 400 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert (cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA, cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA) == (gamma, alpha)
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.INPUT.MIN_SIZE_TEST == 128


def _fake_run(out_dir, ap, fg_per_batch):
    """A finished cell: result.json and metrics.json rows (one per batch) as training writes them."""
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"AP": ap}, f)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        for fg in fg_per_batch:
            f.write(json.dumps({"assign/anchors_per_image": 3069.0, "assign/fg_anchors_per_image/all": fg,
                                "assign/bg_anchors_per_image": 3000.0 - fg, "iteration": 1}) + "\n")
        f.write(json.dumps({"bbox/AP": ap, "iteration": 2}) + "\n")


def test_report_takes_the_ratio_of_means_and_the_seed_spread(tmp_path):
    for seed, (fl, ce) in {1: (10.0, 14.0), 2: (12.0, 12.0)}.items():
        _fake_run(study.cell_dir(str(tmp_path), "x22", study.FL, seed), fl, [0.0, 2.0])
        _fake_run(study.cell_dir(str(tmp_path), "x22", study.CE, seed), ce, [0.0, 2.0])
    table = tmp_path / "table.md"
    figure = tmp_path / "figure.png"
    result = study.main(["--output-dir", str(tmp_path), "--report-only", "--table", str(table), "--figure", str(figure)])
    level = result["imbalance"]["x22"]
    # mean fg = 1, mean bg = 2999: the median of [0, 2] batches would say "no foreground"
    assert level["fg"] == 1.0 and level["bg_per_fg"] == 2999.0 and level["batches"] == 8
    assert study.difference(result["aps"], "x22") == pytest.approx((-2.0, (2.0 / 2 + 2.0 / 2) ** 0.5))
    text = table.read_text()
    assert "| x22 | 44,000 | 3,069 | 1.0 | 1:2,999 | 11.0 ± 1.4 (10.0, 12.0) | 13.0 ± 1.4 (14.0, 12.0) | -2.0 ± 1.4 |" in text
    assert "| x1 |" not in text  # levels without finished cells are left out, not zero
    assert figure.stat().st_size > 0


def test_one_run_reports_no_spread_rather_than_zero():
    aps = {("x1", study.FL): [5.0], ("x1", study.CE): [15.0]}
    assert study._cell_text([5.0]) == "5.0 (1 run)" and study._cell_text([]) == "—"
    d, se = study.difference(aps, "x1")
    assert d == -10.0 and math.isnan(se)


def test_a_run_without_detections_counts_as_zero_and_is_marked(tmp_path):
    """COCO gives NaN AP for no detections (CE's scores can all fall below the threshold)."""
    _fake_run(study.cell_dir(str(tmp_path), "x10", study.CE, 1), math.nan, [2.0])
    _fake_run(study.cell_dir(str(tmp_path), "x10", study.FL, 1), 0.5, [2.0])
    aps, empty = study.collect(study.finished(str(tmp_path), study.cells([1], [])))
    assert aps["x10", study.CE] == [0.0] and empty["x10", study.CE] == 1 and empty["x10", study.FL] == 0
    assert study._cell_text(aps["x10", study.CE], 1) == "0.0 (1 run) [1 without a detection]"


def test_rescoring_ranks_the_detections_that_the_score_threshold_dropped(tmp_path):
    """An untrained model scores ~π = .01 everywhere: nothing passes 0.05 (AP counted 0), and
    at threshold 0 its detections are ranked; each result is cached beside the cell."""
    register_builtin_shapes()
    out = tmp_path / "x1_seed1" / study.CE
    _fake_run(str(out), 20.0, [2.0])  # result.json and metrics.json of a finished cell
    path, opts = study.cell_args("x1", study.CE, 1)
    tiny = ["DATASETS.TEST", ("retina_focal_shapes_tiny_val",), "TEST.BACKEND.CACHE_DIR", str(tmp_path / "cache")]
    cfg = sweep.sweep_config(path, study.BUDGET, opts + tiny)
    (out / "sweep_config.yaml").write_text(cfg.dump())
    torch.save({"model": build_model(cfg).state_dict()}, out / "model_final.pth")
    assert math.isnan(study.rescored_ap(str(out), 0.05))  # no detection: collect() counts it as 0
    ranked = study.rescored_ap(str(out), 0.0)
    assert 0.0 <= ranked <= 100.0 and (out / "score_thresh_0.json").exists()
    os.remove(out / "model_final.pth")  # a second call reads the cache
    assert study.rescored_ap(str(out), 0.0) == ranked
    table = tmp_path / "table.md"
    study.main(["--output-dir", str(tmp_path), "--report-only", "--score-thresh", "0", "--table", str(table)])
    first, second = table.read_text().split("The same models with MODEL.RETINANET.SCORE_THRESH_TEST 0")
    assert "| 20.0 (1 run) |" in first and f"| {ranked:.1f} (1 run) |" in second
