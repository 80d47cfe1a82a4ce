"""PNG figures of the diagnostics: anchor coverage before/after."""
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .anchor_coverage import RATIO_EDGES, SIDE_EDGES, AnchorCoverage, _binned  # noqa: E402

__all__ = ["plot_anchor_coverage"]


def _save(fig, output: str) -> str:
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


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
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
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
    return _save(fig, output)
