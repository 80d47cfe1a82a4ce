#!/usr/bin/env python
"""Figures 1, 4 and 5 of the paper, recomputed, and a picture of the §4 anchor assignment.

    python tools/figures.py fig1 --output docs/figures/fig1_focal_loss.png
    python tools/figures.py fig5 --output docs/figures/fig5_fl_star.png
    python tools/figures.py fig4 --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --weights output/shapes_demo/model_final.pth --num-images 200 --output docs/figures/fig4_loss_cdf.png
    python tools/figures.py anchors --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --dataset-index 2 --output docs/figures/anchor_assignment.png

* ``fig1``: the focal loss FL(p_t) = -(1 - p_t)^γ log(p_t) against p_t for γ ∈ {0, .5, 1, 2, 5}.
* ``fig5``: CE, FL (γ = 2) and FL* (Appendix A) against x_t = y·x.
* ``fig4``: §5.1 "Analysis of the Focal Loss" on a trained model: run it on images of
  ``DATASETS.TEST[0]``, label the anchors with the model's §4 rule, compute each anchor's
  FL for several γ and plot, separately for positive and negative anchors, the cumulative
  sum of the sorted, normalized losses against the fraction of anchors.
* ``anchors``: which anchors of each FPN level are foreground (coloured by their ground-truth
  box), ignored or background for one image of ``DATASETS.TRAIN[0]``. The assignment depends
  on the config only (anchor sizes, IoU thresholds, input size), not on trained weights,
  and it needs ground truth: an image file without annotations would only show background
  anchors, so images are picked from a registered dataset, by index or by file name.

Trailing ``KEY VALUE`` pairs override the config, as in ``train_net.py``.
"""
import argparse
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import matplotlib
import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.detection_utils import build_augmentation, convert_image_to_rgb
from detectron2.structures import Boxes, pairwise_iou
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import Tensor
from torch.nn import functional as F

from retina_focal.config.load import load_config
from retina_focal.data import register_config_datasets
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.export.predictor import load_inference_model
from retina_focal.modeling.losses import sigmoid_focal_loss, sigmoid_focal_loss_star
from retina_focal.modeling.matching import AnchorAssignment
from retina_focal.utils.visualize import new_figure, save_figure

PAPER_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)  # the γ of Figures 1 and 4
BATCH_SIZE = 8  # images per forward pass in fig4
PLOT_POINTS = 2000  # points per CDF curve drawn (the data has up to ~10^6)
HARD_FRACTION = 0.2  # §5.1: "approximately 20% of the hardest positive samples ..."
GT_LINEWIDTH, FG_LINEWIDTH = 2.5, 1.0  # anchors panel: ground-truth boxes, foreground anchors
IGNORED_STYLE = {"color": "0.2", "linestyle": (0, (3, 3)), "linewidth": 0.7, "alpha": 0.6}


# ---------------------------------------------------------------- the loss curves (Figures 1, 5)


def focal_loss_of_pt(p_t: np.ndarray, gamma: float) -> np.ndarray:
    """FL(p_t) = -(1 - p_t)^γ log(p_t) (eq. 4, no α), computed by retina_focal's loss.

    Args:
        p_t (ndarray): probabilities of the ground-truth class in (0, 1).
        gamma (float): γ ≥ 0; γ = 0 is CE.
    """
    x_t = torch.logit(torch.as_tensor(p_t, dtype=torch.float64))  # p_t = σ(x_t)
    return sigmoid_focal_loss(x_t, torch.ones_like(x_t), alpha=-1, gamma=gamma).numpy()


def focal_loss_star(x_t: Tensor, gamma: float, beta: float) -> Tensor:
    """FL* = -log σ(γ·x_t + β) / γ (Appendix A, eqs. 7 and 8) without α; γ = 1, β = 0 is CE."""
    return sigmoid_focal_loss_star(x_t, torch.ones_like(x_t), alpha=-1, gamma=gamma, beta=beta)


def figure5_curves(x_t: np.ndarray) -> Dict[str, np.ndarray]:
    """The four losses of Figure 5 against x_t = y·x (eq. 6), keyed by legend label."""
    x = torch.as_tensor(x_t, dtype=torch.float64)
    return {
        "CE": (-F.logsigmoid(x)).numpy(),
        "FL, γ = 2": sigmoid_focal_loss(x, torch.ones_like(x), alpha=-1, gamma=2.0).numpy(),
        "FL*, γ = 2, β = 1": focal_loss_star(x, 2.0, 1.0).numpy(),
        "FL*, γ = 4, β = 0": focal_loss_star(x, 4.0, 0.0).numpy(),
    }


def _plot_loss_curves(
    x: np.ndarray, curves: Dict[str, np.ndarray], xlabel: str, title: str, easy_from: float, output: str
) -> str:
    """One axes of loss curves (y clipped to [0, 5] as in the paper), the well-classified
    region x > ``easy_from`` shaded."""
    fig, ax = new_figure(figsize=(6.4, 4.6))
    lo, hi = np.floor(x.min()), np.ceil(x.max())
    ax.axvspan(easy_from, hi, color="0.92", zorder=0)
    ax.text((easy_from + hi) / 2, 2.5, "well-classified\nexamples", ha="center", va="center", color="0.35")
    for label, y in curves.items():
        ax.plot(x, y, linewidth=2, label=label)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", framealpha=0.95)
    return save_figure(fig, output)


def plot_figure1(output: str, gammas: Sequence[float] = PAPER_GAMMAS) -> str:
    """Figure 1: FL against the probability of the ground-truth class, one curve per γ."""
    p_t = np.linspace(1e-3, 1 - 1e-6, 1000)
    curves = {
        (f"γ = {g:g} (CE)" if g == 0 else f"γ = {g:g}"): focal_loss_of_pt(p_t, g) for g in gammas
    }
    title = "Figure 1: FL(p$_t$) = −(1 − p$_t$)$^γ$ log(p$_t$)"
    return _plot_loss_curves(p_t, curves, "probability of ground-truth class p$_t$", title, 0.5, output)


def plot_figure5(output: str) -> str:
    """Figure 5: CE, FL and FL* against x_t ∈ [-5, 5]."""
    x_t = np.linspace(-5, 5, 1000)
    title = "Figure 5: FL* = −log σ(γ x$_t$ + β) / γ (Appendix A)"
    return _plot_loss_curves(x_t, figure5_curves(x_t), "x$_t$ = y·x (logit of the true label)", title, 0.0, output)


# ------------------------------------------------------------------- model, config and data


def load_cfg(config_file: str, opts: Sequence[str] = ()):
    """The frozen cfg, built as train_net.py builds it (builtin shapes datasets registered)."""
    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg


def load_model(cfg, weights: str = ""):
    """The model of ``cfg`` in eval mode, with ``weights`` loaded if given (all of its tensors
    must be in them)."""
    if weights:
        return load_inference_model(cfg, weights, backend=False)
    return RetinaFocalTrainer.build_model(cfg).eval()


def labelled_mapper(cfg) -> DatasetMapper:
    """A DatasetMapper that keeps the annotations (``is_train=True``) but applies only the
    test-time resize: no flip or jitter, so every run sees the same anchors and boxes."""
    augmentations = build_augmentation(cfg, is_train=False)
    return DatasetMapper(is_train=True, augmentations=augmentations, image_format=cfg.INPUT.FORMAT)


def labelled_batches(
    cfg, dataset_name: str, indices: Sequence[int], batch_size: int = BATCH_SIZE
) -> Iterator[List[Dict]]:
    """Batches of mapped dataset dicts ("image" CHW, "instances" with gt boxes and classes)."""
    dicts = DatasetCatalog.get(dataset_name)
    mapper = labelled_mapper(cfg)
    for start in range(0, len(indices), batch_size):
        yield [mapper(dicts[i]) for i in indices[start : start + batch_size]]


@torch.no_grad()
def run_and_label(model, batched_inputs: List[Dict]) -> Tuple[List, Tensor, AnchorAssignment]:
    """The model's anchors and logits and the §4 assignment of its anchors, for one batch.

    Returns:
        anchors (list[Boxes]): per level (HiWiA, 4).
        logits (Tensor): (N, R, K), R = sum(Hi*Wi*A).
        assignment (AnchorAssignment): labels (N, R) in {-1 ignore, 0..K-1 class, K
            background}, matched boxes and their indices.
    """
    anchors, logits, _, assignment = model.labelled_predictions(batched_inputs)
    return anchors, torch.cat(logits, dim=1), assignment


# ------------------------------------------------------------------------ Figure 4: loss CDFs


def split_logits(logits: Tensor, gt_labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Separate positive and negative anchors (ignored anchors are dropped).

    Args:
        logits (Tensor): (N, R, K).
        gt_labels (Tensor): (N, R) in {-1 ignore, 0..K-1 class, K background}.

    Returns:
        pos_logits (Tensor): (P,) each foreground anchor's logit of its ground-truth class.
        neg_logits (Tensor): (B, K) all logits of each background anchor.
    """
    num_classes = logits.shape[-1]
    fg = (gt_labels >= 0) & (gt_labels < num_classes)  # (N, R)
    pos_logits = logits[fg].gather(1, gt_labels[fg].unsqueeze(1)).squeeze(1)  # (P,)
    return pos_logits, logits[gt_labels == num_classes]  # (P,), (B, K)


def anchor_focal_losses(pos_logits: Tensor, neg_logits: Tensor, gamma: float) -> Tuple[np.ndarray, np.ndarray]:
    """FL of each sample of Figure 4, without α.

    A sample is an anchor ("window", §5.1). A positive anchor's loss is the FL of its
    ground-truth class output (y = 1); a negative anchor's loss is the sum of the FL of its
    K outputs (all y = 0), its whole share of the training loss. Every term within one
    panel then carries the same α_t (α for positives, 1 - α for negatives), so α cancels in
    the normalization and is left out.

    Args:
        pos_logits (Tensor): (P,); neg_logits (Tensor): (B, K); see :func:`split_logits`.
        gamma (float): γ ≥ 0.

    Returns:
        (ndarray, ndarray): losses (P,) and (B,).
    """
    pos = sigmoid_focal_loss(pos_logits, torch.ones_like(pos_logits), alpha=-1, gamma=gamma)
    neg = sigmoid_focal_loss(neg_logits, torch.zeros_like(neg_logits), alpha=-1, gamma=gamma).sum(dim=1)
    return pos.double().numpy(), neg.double().numpy()


def loss_cdf(losses: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Figure 4's curve: losses sorted from low to high, normalized to sum to 1, cumulated.

    Args:
        losses (ndarray): (n,) non-negative, not all zero.

    Returns:
        x (ndarray): (n + 1,) fraction of samples, 0 … 1.
        y (ndarray): (n + 1,) cumulative normalized loss, 0 … 1, non-decreasing.
    """
    losses = np.sort(np.asarray(losses, dtype=np.float64))
    if losses.size == 0 or losses.sum() <= 0:
        raise ValueError(f"loss_cdf needs at least one positive loss, got {losses.size} samples")
    x = np.arange(losses.size + 1) / losses.size
    y = np.concatenate([[0.0], np.cumsum(losses)]) / losses.sum()
    return x, np.minimum(y, 1.0)  # cumsum rounding may overshoot 1 by ~1e-16


def hardest_share(x: np.ndarray, y: np.ndarray, fraction: float = HARD_FRACTION) -> float:
    """Share of the total loss carried by the hardest ``fraction`` of the samples."""
    return float(1.0 - np.interp(1.0 - fraction, x, y))


@torch.no_grad()
def collect_logits(model, cfg, dataset_name: str, num_images: int) -> Tuple[Tensor, Tensor, int]:
    """:func:`split_logits` over the first ``num_images`` images of ``dataset_name``.

    Returns:
        pos_logits (P,), neg_logits (B, K) and the number of images used.
    """
    indices = list(range(min(num_images, len(DatasetCatalog.get(dataset_name)))))
    pos, neg = [], []
    for batch in labelled_batches(cfg, dataset_name, indices):
        _, logits, assignment = run_and_label(model, batch)
        p, n = split_logits(logits, assignment.labels)
        pos.append(p)
        neg.append(n)
    return torch.cat(pos), torch.cat(neg), len(indices)


def figure4_data(pos_logits: Tensor, neg_logits: Tensor, gammas: Sequence[float]) -> Dict[str, Dict[float, Tuple]]:
    """``{"positive" | "negative": {γ: (x, y)}}``, the curves of :func:`loss_cdf`."""
    data: Dict[str, Dict[float, Tuple]] = {"positive": {}, "negative": {}}
    for gamma in gammas:
        pos, neg = anchor_focal_losses(pos_logits, neg_logits, gamma)
        data["positive"][gamma] = loss_cdf(pos)
        data["negative"][gamma] = loss_cdf(neg)
    return data


def _thin(x: np.ndarray, y: np.ndarray, num: int = PLOT_POINTS) -> Tuple[np.ndarray, np.ndarray]:
    """At most ``num`` points of a curve, evenly spaced in x, ends kept."""
    keep = np.unique(np.linspace(0, len(x) - 1, num).round().astype(int))
    return x[keep], y[keep]


def plot_figure4(data: Dict[str, Dict[float, Tuple]], counts: Dict[str, int], subtitle: str, output: str) -> str:
    """Two panels (positive, negative anchors), one CDF per γ; the legend gives the share
    of the loss carried by the hardest 20% of the anchors."""
    fig, axes = new_figure(1, 2, figsize=(12, 5.2))
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(data["positive"])))
    for ax, kind in zip(axes, ("positive", "negative")):
        for colour, (gamma, (x, y)) in zip(colours, data[kind].items()):
            share = hardest_share(x, y)
            ax.plot(*_thin(x, y), color=colour, linewidth=2, label=f"γ = {gamma:g}: {share:.0%}")
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="equal losses")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"fraction of {kind} anchors (sorted by loss, low to high)")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_title(f"{kind} anchors ({counts[kind]:,})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", title=f"loss share of the hardest {HARD_FRACTION:.0%}", framealpha=0.95)
    fig.suptitle(f"Figure 4: CDF of the normalized focal loss (α cancels in the normalization)\n{subtitle}")
    return save_figure(fig, output)


def make_figure4(cfg, weights: str, output: str, num_images: int, gammas: Sequence[float] = PAPER_GAMMAS) -> str:
    """Figure 4 for the model of ``cfg`` with ``weights`` on ``cfg.DATASETS.TEST[0]``."""
    model = load_model(cfg, weights)
    dataset_name = cfg.DATASETS.TEST[0]
    pos_logits, neg_logits, used = collect_logits(model, cfg, dataset_name, num_images)
    data = figure4_data(pos_logits, neg_logits, gammas)
    trained = f"trained with γ = {cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA:g}"
    subtitle = f"{os.path.basename(weights) or 'untrained'} ({trained}) on {used} images of {dataset_name}"
    counts = {"positive": len(pos_logits), "negative": len(neg_logits)}
    return plot_figure4(data, counts, subtitle, output)


# ------------------------------------------------------------- the anchor assignment picture


def find_dataset_index(dataset_name: str, image: str) -> int:
    """Index of the dataset dict whose ``file_name`` is ``image`` (or ends with its name)."""
    for i, d in enumerate(DatasetCatalog.get(dataset_name)):
        if os.path.abspath(d["file_name"]) == os.path.abspath(image) or os.path.basename(d["file_name"]) == image:
            return i
    raise ValueError(
        f"{image} is not an image of {dataset_name}; the assignment needs its annotations, so "
        "pick an image of a registered dataset (--dataset-index or its file name)"
    )


@torch.no_grad()
def anchor_assignment(model, inputs: Dict) -> List[Dict]:
    """The §4 labels of every anchor of one image, per FPN level.

    Args:
        inputs (dict): a mapped dataset dict with "image" and "instances".

    Returns:
        list[dict], one per level: "boxes" (HiWiA, 4) anchors; "labels" (HiWiA,) in
        {-1, 0..K-1, K}; "gt_index" (HiWiA,) the matched ground-truth box of foreground
        anchors (-1 elsewhere); all numpy, in the input frame.
    """
    anchors, _, assignment = run_and_label(model, [inputs])
    labels = assignment.labels[0]  # (R,)
    gt_index = torch.where(assignment.foreground[0], assignment.matched_idxs[0], -1)  # (R,)
    sizes = [len(a) for a in anchors]
    return [
        {"boxes": a.tensor.cpu().numpy(), "labels": lab.cpu().numpy(), "gt_index": idx.cpu().numpy()}
        for a, lab, idx in zip(anchors, labels.split(sizes), gt_index.split(sizes))
    ]


def _draw_level(ax, rgb: np.ndarray, level: Dict, gt_boxes: np.ndarray, colours, num_classes: int, title: str) -> None:
    """One panel: the image, faint background anchor centres, dashed ignored anchors,
    foreground anchors in their box's colour and the ground-truth boxes."""
    height, width = rgb.shape[:2]
    ax.imshow(rgb, extent=(0, width, height, 0), alpha=0.55)
    boxes, labels, gt_index = level["boxes"], level["labels"], level["gt_index"]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    bg = labels == num_classes
    ax.plot(*centres[bg].T, ".", color="0.25", markersize=1.5, alpha=0.5)
    for x1, y1, x2, y2 in boxes[labels == -1]:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **IGNORED_STYLE))
    for i, (x1, y1, x2, y2) in enumerate(gt_boxes):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=(*colours[i][:3], 0.2), edgecolor=colours[i],
                               linewidth=GT_LINEWIDTH))
    fg = np.flatnonzero((labels >= 0) & (labels < num_classes))
    for j in fg:
        x1, y1, x2, y2 = boxes[j]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours[gt_index[j]],
                               linewidth=FG_LINEWIDTH))
    ax.plot(*centres[fg].T, "o", color="white", markeredgecolor="black", markersize=3.5)
    margin = 0.15 * max(height, width)
    ax.set_xlim(-margin, width + margin)
    ax.set_ylim(height + margin, -margin)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\n{len(fg)} fg · {int((labels == -1).sum())} ignored · {int(bg.sum())} bg", fontsize=10)


def _assignment_legend(ax, gt_boxes: np.ndarray, gt_classes: np.ndarray, class_names: Sequence[str],
                       levels: List[Dict], level_names: Sequence[str], colours) -> None:
    """The last panel: one line per ground-truth box with its foreground anchors per level
    and its best IoU with any anchor (< 0.5: foreground only by the low-quality rule), then
    the line styles."""
    ax.axis("off")
    anchors = Boxes(torch.as_tensor(np.concatenate([lv["boxes"] for lv in levels])))
    best_iou = pairwise_iou(Boxes(torch.as_tensor(gt_boxes)), anchors).max(dim=1).values  # (G,)
    handles, texts = [], []
    for i, ((x1, y1, x2, y2), cls) in enumerate(zip(gt_boxes, gt_classes)):
        per_level = [int((lv["gt_index"] == i).sum()) for lv in levels]
        matched = ", ".join(f"{n.upper()}: {c}" for n, c in zip(level_names, per_level) if c) or "none"
        handles.append(Line2D([], [], color=colours[i], linewidth=GT_LINEWIDTH))
        texts.append(f"{class_names[cls]} {x2 - x1:.0f}×{y2 - y1:.0f} px: {matched} (best IoU {best_iou[i]:.2f})")
    handles += [
        Line2D([], [], color="black", linewidth=FG_LINEWIDTH),
        Line2D([], [], **IGNORED_STYLE),
        Line2D([], [], marker=".", color="0.25", linestyle="", markersize=5),
    ]
    texts += ["foreground anchor (colour of its box), ○ its centre", "ignored anchor (IoU between the thresholds)",
              "background anchor centre"]
    ax.legend(handles, texts, loc="center", fontsize=9, frameon=False,
              title="ground-truth box: foreground anchors per level")


def plot_anchor_assignment(model, cfg, inputs: Dict, class_names: Sequence[str], title: str, output: str) -> str:
    """One panel per FPN level (see :func:`_draw_level`) and a legend panel."""
    levels = anchor_assignment(model, inputs)
    rgb = convert_image_to_rgb(inputs["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
    instances = inputs["instances"]
    gt_boxes, gt_classes = instances.gt_boxes.tensor.numpy(), instances.gt_classes.numpy()
    colours = matplotlib.colormaps["tab10"](np.arange(len(gt_boxes)) % 10)
    names = model.head_in_features
    strides = model.anchor_generator.strides
    ncols = 3
    nrows = -(-(len(levels) + 1) // ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(4.3 * ncols, 4.5 * nrows))
    axes = axes.ravel()
    for ax, level, name, stride in zip(axes, levels, names, strides):
        sides = np.sqrt(np.prod(level["boxes"][:, 2:] - level["boxes"][:, :2], axis=1))
        level_title = f"{name.upper()}: stride {stride}, anchors {sides.min():.0f}–{sides.max():.0f} px"
        _draw_level(ax, rgb, level, gt_boxes, colours, model.num_classes, level_title)
    _assignment_legend(axes[len(levels)], gt_boxes, gt_classes, class_names, levels, names, colours)
    for ax in axes[len(levels) + 1 :]:
        ax.axis("off")
    bg_below, fg_from = cfg.MODEL.RETINANET.IOU_THRESHOLDS
    fig.suptitle(f"Anchor assignment (§4: fg IoU ≥ {fg_from}, bg < {bg_below}, ignored between) — {title}")
    return save_figure(fig, output)


def make_anchor_figure(cfg, output: str, dataset_index: int = 0, image: str = "", dataset_name: str = "") -> str:
    """The anchor assignment of one image of ``dataset_name`` (default ``DATASETS.TRAIN[0]``),
    chosen by index or by file name. Untrained weights suffice: labels depend on geometry."""
    dataset_name = dataset_name or cfg.DATASETS.TRAIN[0]
    register_config_datasets(cfg, [dataset_name])  # a coco:/voc:/csv: spec
    if image:
        dataset_index = find_dataset_index(dataset_name, image)
    model = load_model(cfg)
    inputs = next(labelled_batches(cfg, dataset_name, [dataset_index]))[0]
    class_names = MetadataCatalog.get(dataset_name).thing_classes
    title = f"{dataset_name}[{dataset_index}], input {inputs['image'].shape[2]}×{inputs['image'].shape[1]} px"
    return plot_anchor_assignment(model, cfg, inputs, class_names, title, output)


# ------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fig1", "Figure 1: FL vs p_t for several γ"), ("fig5", "Figure 5: CE, FL and FL* vs x_t")):
        sub.add_parser(name, help=text).add_argument("--output", required=True, help="PNG file to write")
    fig4 = sub.add_parser("fig4", help="Figure 4: loss CDFs of a trained model's anchors")
    fig4.add_argument("--weights", required=True, help="checkpoint (.pth) of the model")
    fig4.add_argument("--num-images", type=int, default=200, help="first N images of DATASETS.TEST[0]")
    fig4.add_argument("--gammas", type=float, nargs="+", default=list(PAPER_GAMMAS), help="γ of the curves")
    anchors = sub.add_parser("anchors", help="foreground / ignored / background anchors of one image")
    choice = anchors.add_mutually_exclusive_group()
    choice.add_argument("--dataset-index", type=int, default=0, help="index in the dataset (default 0)")
    choice.add_argument("--image", default="", help="file name (or path) of an image of the dataset")
    anchors.add_argument("--dataset", default="", help="registered dataset or coco:/voc:/csv: spec (default DATASETS.TRAIN[0])")
    for model_parser in (fig4, anchors):
        model_parser.add_argument("--config-file", required=True, metavar="FILE")
        model_parser.add_argument("--output", required=True, help="PNG file to write")
        model_parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv: Sequence[str] = None) -> str:
    """Run one subcommand; return the written PNG's path."""
    args = build_parser().parse_args(argv)
    if args.command == "fig1":
        path = plot_figure1(args.output)
    elif args.command == "fig5":
        path = plot_figure5(args.output)
    elif args.command == "fig4":
        cfg = load_cfg(args.config_file, args.opts)
        path = make_figure4(cfg, args.weights, args.output, args.num_images, args.gammas)
    else:
        cfg = load_cfg(args.config_file, args.opts)
        path = make_anchor_figure(cfg, args.output, args.dataset_index, args.image, args.dataset)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
