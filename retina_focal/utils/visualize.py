"""Pictures of a run: training curves from ``metrics.json`` and predictions beside ground truth."""
import json
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer
from matplotlib.figure import Figure

__all__ = ["read_metrics", "plot_training_curves", "draw_predictions", "new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize, **subplot_kw):
    """(figure, axes) as pyplot's ``subplots`` gives them, as a plain matplotlib ``Figure``:
    no backend is chosen or changed (nothing global), and nothing needs closing."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig, output: str, dpi: int = 110) -> str:
    """Lay out ``fig``, write it as a PNG (folders created); returns ``output``."""
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    return output


def read_metrics(metrics_json: str) -> List[Dict]:
    """Rows of detectron2's ``metrics.json`` (one JSON object per line)."""
    with open(metrics_json) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: List[Dict], key: str):
    pts = [(r["iteration"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(metrics_json: str, out_png: str, ap_key: str = "bbox/AP") -> str:
    """Loss terms (log scale) and learning rate, and COCO AP at each evaluation, vs iteration."""
    rows = read_metrics(metrics_json)
    fig, (ax_loss, ax_ap) = new_figure(1, 2, figsize=(11, 4))
    for key in ("total_loss", "loss_cls", "loss_box_reg"):
        ax_loss.plot(*_series(rows, key), label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training losses")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(*_series(rows, "lr"), color="grey", linestyle=":", label="lr")
    ax_lr.set_ylabel("learning rate")
    ax_loss.legend(loc="upper right")
    for key, style in ((ap_key, "o-"), ("bbox/AP50", "s--"), ("bbox/AP75", "^--")):
        its, values = _series(rows, key)
        if its:
            ax_ap.plot(its, values, style, label=key.split("/")[-1])
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO box AP (%)")
    ax_ap.set_ylim(0, 100)
    ax_ap.set_title("validation AP")
    ax_ap.legend(loc="lower right")
    ax_ap.grid(alpha=0.3)
    return save_figure(fig, out_png, dpi=100)


@torch.no_grad()
def draw_predictions(
    model,
    dataset_name: str,
    out_dir: str,
    indices: Sequence[int] = range(8),
    score_thresh: float = 0.3,
    scale: float = 3.0,
    input_format: str = "BGR",
) -> List[str]:
    """Draw predictions (left) beside ground truth (right) for some images of a dataset.

    Args:
        model: a detectron2 model in eval mode, taking {"image": CHW float tensor} in
            ``input_format`` channel order (``INPUT.FORMAT``: "BGR" or "RGB").
        dataset_name: a registered dataset with ``thing_classes``.
        out_dir: where ``<image id>.png`` files go.
        indices: which dataset dicts to draw.
        score_thresh: hide predictions below this score.
        scale: upscaling of the (small) images for legibility.

    Returns:
        list[str]: the written PNG paths.
    """
    dicts = DatasetCatalog.get(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in indices:
        d = dicts[i]
        rgb = read_image(d["file_name"], format="RGB")
        pixels = rgb if input_format == "RGB" else rgb[:, :, ::-1]  # what the model was trained on
        image = torch.as_tensor(np.ascontiguousarray(pixels.transpose(2, 0, 1)), dtype=torch.float32)
        instances = model([{"image": image}])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= score_thresh]
        pred = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
        gt = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(d).get_image()
        canvas = np.concatenate([pred, np.full((pred.shape[0], 8, 3), 255, np.uint8), gt], axis=1)
        path = os.path.join(out_dir, f"{d['image_id']}.png")
        cv2.imwrite(path, canvas[:, :, ::-1])
        paths.append(path)
    return paths
