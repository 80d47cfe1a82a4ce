"""PNG figures of the diagnostics: anchor coverage before/after, PR curves, confusion matrix."""
from typing import Dict, Sequence, Tuple

import matplotlib
import numpy as np

from retina_focal.diagnostics.anchor_coverage import (
    RATIO_EDGES,
    SIDE_EDGES,
    AnchorCoverage,
    _binned,
)
from retina_focal.diagnostics.error_analysis import FP_TYPES, MatchSummary
from retina_focal.utils.visualize import new_figure, save_figure

__all__ = ["plot_anchor_coverage", "plot_confusion", "plot_precision_recall"]


def _coverage_curve(result: AnchorCoverage, values: np.ndarray, edges: Sequence[float], fmt: str):
    """Labels, box counts and the shares ≥ fg IoU and ≥ bg IoU of each non-empty bin."""
    rows = [(label, mask) for label, mask in _binned(values, edges, fmt) if mask.any()]
    labels = [label for label, _ in rows]
    counts = [int(mask.sum()) for _, mask in rows]
    bands = [result.bands(mask) for _, mask in rows]
    return labels, counts, [b[0] for b in bands], [b[0] + b[1] for b in bands]


def plot_anchor_coverage(
    before: AnchorCoverage, after: AnchorCoverage, output: str, title: str, before_label: str = "config anchors"
) -> str:
    """Two panels, box size and aspect ratio: for each bin the share of boxes whose best
    anchor reaches the foreground IoU (solid) or the ignore band (dashed), before and after,
    over grey bars giving the number of boxes."""
    low, high = before.thresholds
    fig, axes = new_figure(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    panels = ((axes[0], "side", SIDE_EDGES, "{:.0f}", "box size √(w·h) at the input size (px)"),
              (axes[1], "aspect", RATIO_EDGES, "{:.2g}", "box aspect ratio h / w"))
    for ax, attr, edges, fmt, xlabel in panels:
        labels, counts, _, _ = _coverage_curve(before, getattr(before, attr), edges, fmt)
        x = np.arange(len(labels))
        bars = ax.twinx()
        bars.bar(x, counts, color="0.88", zorder=0)
        bars.set_ylabel("boxes per bin", color="0.45")
        bars.tick_params(axis="y", colors="0.45")
        ax.set_zorder(bars.get_zorder() + 1)
        ax.patch.set_visible(False)
        for result, colour, name in ((before, "tab:red", before_label), (after, "tab:blue", "proposed anchors")):
            _, _, fg, fg_or_ignored = _coverage_curve(result, getattr(result, attr), edges, fmt)
            ax.plot(x, fg, "o-", color=colour, linewidth=2,
                    label=f"{name}: IoU ≥ {high:g} ({result.foreground_share:.1%} of all boxes)")
            ax.plot(x, fg_or_ignored, "s--", color=colour, linewidth=1, alpha=0.7, label=f"{name}: IoU ≥ {low:g}")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=35, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of boxes whose best anchor reaches")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8.5, framealpha=0.95)
    fig.suptitle(title)
    return save_figure(fig, output)


def plot_precision_recall(
    curves: Dict[float, Tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: Sequence[str],
    ap: Dict[str, float], output: str, title: str,
) -> str:
    """One panel per IoU threshold: each class's interpolated PR curve (legend: its AP) and
    the overall curve (mean precision over the classes, black); ``curves`` maps the IoU to
    :func:`retina_focal.diagnostics.error_analysis.precision_recall`'s output."""
    fig, axes = new_figure(1, len(curves), figsize=(6.2 * len(curves), 5.2), squeeze=False)
    colours = matplotlib.colormaps["tab10"](np.arange(len(class_names)) % 10)
    for ax, (iou, (recall, precision, overall)) in zip(axes[0], curves.items()):
        for k, name in enumerate(class_names):
            ax.plot(recall, precision[k], color=colours[k], linewidth=1.6, label=f"{name} (AP {ap[name]:.1f})")
        ax.plot(recall, overall, color="black", linewidth=2.6, label=f"all classes (mean: AP{iou * 100:.0f} {overall.mean() * 100:.1f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (interpolated)")
        ax.set_title(f"IoU ≥ {iou:g}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8.5, title="class (AP@[.5:.95])", framealpha=0.95)
    fig.suptitle(title)
    return save_figure(fig, output)


def plot_confusion(summary: MatchSummary, class_names: Sequence[str], output: str, title: str) -> str:
    """Left: the confusion matrix with counts (rows: ground truth + "background"; columns:
    detections + "missed"), colours normalized per row. Right: false-positive types per class."""
    rows = list(class_names) + ["background\n(no box)"]
    cols = list(class_names) + ["missed"]
    matrix = summary.confusion
    row_sums = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, (ax, ax_fp) = new_figure(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.15, 1]})
    ax.imshow(matrix / row_sums, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if i == matrix.shape[0] - 1 and j == matrix.shape[1] - 1:
                continue  # background x missed: not a thing
            share = matrix[i, j] / row_sums[i, 0]
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if share > 0.6 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.set_xlabel("detected class")
    ax.set_ylabel("ground-truth class")
    ax.set_title("confusion matrix (counts; colour = share of the row)")
    x = np.arange(len(class_names))
    totals = summary.fp_types.sum(axis=0)
    num_fp = max(int(totals.sum()), 1)
    fp_colours = {"localization": "tab:orange", "confusion": "tab:purple", "background": "tab:gray"}
    ax_fp.bar(x, summary.true_positives, color="tab:green", label=f"true positive ({summary.true_positives.sum()})")
    bottom = summary.true_positives.astype(float)
    for t, name in enumerate(FP_TYPES):
        label = f"FP: {name} ({totals[t]}, {totals[t] / num_fp:.0%} of FP)"
        ax_fp.bar(x, summary.fp_types[:, t], bottom=bottom, color=fp_colours[name], label=label)
        bottom += summary.fp_types[:, t]
    ax_fp.set_ylim(0, 1.3 * max(bottom.max(), 1))
    ax_fp.set_xticks(x)
    ax_fp.set_xticklabels(class_names, rotation=30, ha="right")
    ax_fp.set_xlabel("detected class")
    ax_fp.set_ylabel("detections")
    ax_fp.set_title("detections by outcome")
    ax_fp.legend(loc="upper left", fontsize=9, ncol=2, framealpha=0.95)
    ax_fp.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, output)
