#!/usr/bin/env python
"""The imbalance study: the focal loss against α-balanced CE as background anchors per
foreground anchor grow from ~1:150 to ~1:5,300 (docs/ablations_shapes.md).

    python tools/imbalance_study.py --output-dir output/imbalance --score-thresh 0 \\
        --figure docs/figures/imbalance_fl_minus_ce.png

The levels are ``retina_focal.data.IMBALANCE_LEVELS``: the demo's 2,000 training images
followed by 0, 3×, 9× or 21× as many images without objects (same objects, more negatives).
Each cell (level, loss, seed) is one ``tools/sweep.py`` run of the loss's Table 1 config
under ``budgets/shapes_imbalance.yaml`` with ``DATASETS.TRAIN`` and ``SEED`` set, in
``OUTPUT_DIR/<level>_seed<k>/<config>/``; finished cells are skipped, an interrupted one
resumes. Cells run seed by seed, so an early stop leaves whole seeds: FL (γ = 2, α = .25)
and CE (α = .75) at every level for each of ``--seeds``, then CE at α = .5 and .9 at the
highest and lowest level for each of ``--extreme-seeds``. ``--report-only`` tabulates what
has finished. The imbalance of each level is measured on its training batches (the
unsmoothed ``assign/*`` rows of every run's ``metrics.json``).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from matplotlib.ticker import NullFormatter  # noqa: E402

from retina_focal.config.load import load_config  # noqa: E402
from retina_focal.data import IMBALANCE_LEVELS, register_builtin_shapes  # noqa: E402
from retina_focal.data.shapes import DEMO_NUM_TRAIN  # noqa: E402
from retina_focal.engine.defaults import evaluate
from retina_focal.utils.visualize import new_figure, save_figure  # noqa: E402
from tools.sweep import run_one  # noqa: E402

ABLATIONS = os.path.join(REPO, "configs", "Ablations")
BUDGET = os.path.join(ABLATIONS, "budgets", "shapes_imbalance.yaml")
FL, CE = "table1b_fl_gamma_2p0_alpha_25", "table1a_ce_alpha_75"
CE_OTHER_ALPHAS = ("table1a_ce_alpha_50", "table1a_ce_alpha_90")  # run at the extreme levels
ANCHOR_KEYS = ("assign/anchors_per_image", "assign/fg_anchors_per_image/all", "assign/bg_anchors_per_image")


def cells(seeds: Sequence[int], extreme_seeds: Sequence[int], levels: Sequence[str] = ()) -> List[Tuple[str, str, int]]:
    """(level, config, seed) in running order: whole seeds of the main grid first, then CE's
    other α, the highest level (where CE should suffer most) before the lowest. ``levels``
    (default: all) is a subset of IMBALANCE_LEVELS."""
    levels = [lv for lv in IMBALANCE_LEVELS if lv in levels] if levels else list(IMBALANCE_LEVELS)
    main = [(level, config, seed) for seed in seeds for level in levels for config in (FL, CE)]
    extremes = dict.fromkeys((levels[-1], levels[0]))  # one level when only one is run
    extra = [(level, config, seed) for seed in extreme_seeds for level in extremes for config in CE_OTHER_ALPHAS]
    return main + extra


def cell_dir(output_dir: str, level: str, config: str, seed: int) -> str:
    return os.path.join(output_dir, f"{level}_seed{seed}", config)


def cell_args(level: str, config: str, seed: int) -> Tuple[str, List[str]]:
    """The Table 1 config file of a cell and the overrides that set its level and seed."""
    opts = ["DATASETS.TRAIN", f"('retina_focal_shapes_{level}_train',)", "SEED", str(seed)]
    return os.path.join(ABLATIONS, config + ".yaml"), opts


def run_cell(output_dir: str, level: str, config: str, seed: int) -> Dict[str, float]:
    path, opts = cell_args(level, config, seed)
    return run_one(path, cell_dir(output_dir, level, config, seed), BUDGET, opts, num_gpus=1)


def anchor_rows(out_dir: str) -> List[Dict[str, float]]:
    """The training rows of a run's metrics.json that hold the unsmoothed anchor counts."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if all(k in r for k in ANCHOR_KEYS)]


def level_imbalance(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean anchors, foreground and background anchors per image, and bg per fg (ratio of means)."""
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ANCHOR_KEYS}
    anchors, fg, bg = (mean[k] for k in ANCHOR_KEYS)
    return {"anchors": anchors, "fg": fg, "bg": bg, "bg_per_fg": bg / fg, "batches": len(rows)}


def mean_spread(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value: no spread measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def read_ap(out_dir: str) -> float:
    """A finished cell's AP (NaN where the model made no detection: COCO's answer then)."""
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)["AP"]


def rescored_ap(out_dir: str, score_thresh: float) -> float:
    """A finished cell's final model evaluated again with MODEL.RETINANET.SCORE_THRESH_TEST
    ``score_thresh`` (cached in ``score_thresh_<t>.json`` beside it): AP that ranks every
    detection, also those of a model whose scores all fell below the paper's 0.05."""
    cache = os.path.join(out_dir, f"score_thresh_{score_thresh:g}.json")
    if not os.path.exists(cache):
        register_builtin_shapes()
        cfg = load_config(os.path.join(out_dir, "sweep_config.yaml"))
        cfg.merge_from_list(["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"),
                             "MODEL.RETINANET.SCORE_THRESH_TEST", score_thresh,
                             "OUTPUT_DIR", os.path.join(out_dir, f"score_thresh_{score_thresh:g}")])
        results = evaluate(cfg)["bbox"]  # detectron2 unnests the results of a single test set
        with open(cache, "w") as f:
            json.dump(results, f)
    with open(cache) as f:
        return json.load(f)["AP"]


def finished(output_dir: str, todo: Sequence[Tuple[str, str, int]]) -> List[Tuple[str, str, str]]:
    """(level, config, folder) of the cells of ``todo`` that have a result."""
    cells_done = [(level, config, cell_dir(output_dir, level, config, seed)) for level, config, seed in todo]
    return [(level, config, out) for level, config, out in cells_done if os.path.exists(os.path.join(out, "result.json"))]


def level_imbalances(done: Sequence[Tuple[str, str, str]]) -> Dict[str, Dict[str, float]]:
    """Each level's imbalance over the training rows of all its finished cells."""
    rows = defaultdict(list)
    for level, _, out in done:
        rows[level] += anchor_rows(out)
    return {level: level_imbalance(r) for level, r in rows.items()}


def collect(done: Sequence[Tuple[str, str, str]], read: Callable[[str], float] = read_ap) -> Tuple[Dict, Dict]:
    """AP per (level, config) over seeds (``read`` from a cell's folder) and per (level,
    config) the number of runs without a detection. A run without a detection (NaN AP) counts
    as 0: a detector that outputs nothing above MODEL.RETINANET.SCORE_THRESH_TEST finds nothing."""
    aps, empty = defaultdict(list), defaultdict(int)
    for level, config, out in done:
        ap = read(out)
        empty[level, config] += math.isnan(ap)
        aps[level, config].append(0.0 if math.isnan(ap) else ap)
    return aps, empty


def difference(aps: Dict, level: str) -> Tuple[float, float]:
    """AP(FL) − AP(CE α = .75) and its standard error (independent seeds)."""
    (fl, fl_sd), (ce, ce_sd) = mean_spread(aps[level, FL]), mean_spread(aps[level, CE])
    return fl - ce, (fl_sd**2 / len(aps[level, FL]) + ce_sd**2 / len(aps[level, CE])) ** 0.5


def _cell_text(values: Sequence[float], no_detections: int = 0) -> str:
    mark = f" [{no_detections} without a detection]" if no_detections else ""
    if len(values) < 2:
        return f"{values[0]:.1f} (1 run){mark}" if values else "—"
    mean, sd = mean_spread(values)
    return f"{mean:.1f} ± {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)}){mark}"


def table_lines(aps: Dict, empty: Dict, imbalance: Dict, title: str) -> List[str]:
    header = ["level", "train images", "anchors / image", "fg / image", "bg per fg", "FL γ=2 α=.25",
              "CE α=.75", "FL − CE (± s.e.)", "CE α=.5", "CE α=.9"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level, multiple in IMBALANCE_LEVELS.items():
        if level not in imbalance:
            continue
        im = imbalance[level]
        delta = "—"
        if aps[level, FL] and aps[level, CE]:
            d, se = difference(aps, level)
            delta = f"{d:+.1f}" + ("" if math.isnan(se) else f" ± {se:.1f}")
        lines.append("| " + " | ".join(
            [level, f"{DEMO_NUM_TRAIN * multiple:,}", f"{im['anchors']:,.0f}", f"{im['fg']:.1f}", f"1:{im['bg_per_fg']:,.0f}",
             *(_cell_text(aps[level, c], empty[level, c]) for c in (FL, CE)), delta,
             *(_cell_text(aps[level, c], empty[level, c]) for c in CE_OTHER_ALPHAS)])
            + " |")
    return lines


def plot_difference(series: Dict[str, Dict], imbalance: Dict, output: str) -> str:
    """AP(FL) − AP(CE α = .75) ± s.e. against background anchors per foreground anchor, one
    line per entry of ``series`` (label -> AP per (level, config))."""
    fig, ax = new_figure(figsize=(6, 4))
    ax.axhline(0, color="0.5", linewidth=0.8)
    for label, aps in series.items():
        levels = [lv for lv in IMBALANCE_LEVELS if lv in imbalance and aps[lv, FL] and aps[lv, CE]]
        x = [imbalance[lv]["bg_per_fg"] for lv in levels]
        d, se = zip(*(difference(aps, lv) for lv in levels)) if levels else ((), ())
        ax.errorbar(x, d, yerr=[0 if math.isnan(e) else e for e in se], marker="o", capsize=4, label=label)
    for lv in imbalance:
        ax.annotate(lv, (imbalance[lv]["bg_per_fg"], 0), textcoords="offset points", xytext=(-8, -14), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("background anchors per foreground anchor (training batches)")
    ax.set_ylabel("AP(FL γ=2, α=.25) − AP(CE α=.75)")
    iters = load_config(BUDGET).SOLVER.MAX_ITER
    ax.set_title(f"Shapes imbalance levels, R-18-FPN from scratch, {iters} iterations of 16 images", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, output)


def main(argv: Sequence[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--extreme-seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--levels", nargs="+", choices=list(IMBALANCE_LEVELS), default=[],
                        help="run these levels only (default: all); the report covers every level's "
                        "finished cells of --seeds and --extreme-seeds")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished cells, run nothing")
    parser.add_argument("--score-thresh", type=float, help="also evaluate every finished cell at this "
                        "MODEL.RETINANET.SCORE_THRESH_TEST (a second table)")
    parser.add_argument("--figure", default="", help="PNG of FL − CE against the imbalance")
    parser.add_argument("--table", default="", help="markdown table (default OUTPUT_DIR/imbalance.md)")
    args = parser.parse_args(argv)
    if not args.report_only:
        for cell in cells(args.seeds, args.extreme_seeds, args.levels):
            run_cell(args.output_dir, *cell)
    done = finished(args.output_dir, cells(args.seeds, args.extreme_seeds))
    imbalance = level_imbalances(done)
    aps, empty = collect(done)
    command = "python tools/imbalance_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = table_lines(aps, empty, imbalance, f"Made by `{command}`. AP on `retina_focal_shapes_val`: mean ± "
                        "sample s.d. (runs); a run without a detection above the score threshold counts as 0.")
    series = {"score threshold 0.05 (paper; no detection = 0 AP)": aps}
    if args.score_thresh is not None:
        rescored, rescored_empty = collect(done, partial(rescored_ap, score_thresh=args.score_thresh))
        lines += [""] + table_lines(rescored, rescored_empty, imbalance, f"The same models with "
                                    f"MODEL.RETINANET.SCORE_THRESH_TEST {args.score_thresh:g} (the paper's: 0.05):")
        series[f"score threshold {args.score_thresh:g}"] = rescored
    table = args.table or os.path.join(args.output_dir, "imbalance.md")
    os.makedirs(os.path.dirname(table) or ".", exist_ok=True)
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.figure:
        plot_difference(series, imbalance, args.figure)
    return {"aps": dict(aps), "imbalance": imbalance}


if __name__ == "__main__":
    main()
