"""Anchor coverage: which ground-truth boxes the §4 IoU rule can make positive, and anchors that fit.

§4 labels an anchor foreground when its IoU with a box is ≥ 0.5, background below 0.4, and
ignores it in between (``MODEL.RETINANET.IOU_THRESHOLDS``). A box whose best anchor stays
below 0.5 is a positive only through the low-quality rule (its best anchors, whatever their
IoU), and below 0.4 it is a poor regression target as well. :func:`measure_coverage`
measures, for a dataset and a config:

* the share of boxes whose best anchor IoU is ≥ the foreground threshold, in the ignore
  band, or below it, overall and by box size (COCO small/medium/large on the annotation's
  own area, and half-octave bins of √(w·h) after the resize) and aspect ratio (h / w);
* the foreground anchors each box gets, per FPN level, from the model's own matcher
  (low-quality matches and ``MATCH_EVERY_GT`` included).

Boxes are taken at the size the network sees them at test time: each image is resized as
``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)`` does (no resize when
MIN_SIZE_TEST is 0), padded to the backbone's size divisibility, and the anchors are those
of the config's anchor generator on that padded grid. Training may resize differently
(``MIN_SIZE_TRAIN`` jitter); the test-time size is one fixed, reproducible choice.

:func:`propose_anchors` searches anchors with the same structure (the same per-level sizes
up to one common factor, the same number of scales and of ratios) that maximize the share
of boxes at or above the foreground IoU; see its docstring for the search.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.structures import Boxes, BoxMode, pairwise_iou

from retina_focal.modeling.matching import (
    anchor_matcher_from_config,
    foreground_counts,
    foreground_iou_threshold,
)

__all__ = [
    "fit_anchors",
    "AnchorCoverage",
    "GroundTruthBoxes",
    "measure_coverage",
    "anchor_config_lines",
    "coverage_table",
    "propose_anchors",
    "random_box_dicts",
    "resized_ground_truth",
    "with_anchors",
]


COCO_AREA_BINS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))  # COCOeval
SIDE_EDGES = tuple(8 * 2 ** (k / 2) for k in range(13))  # 8 … 512 px, half octaves, on √(w·h) after resize
RATIO_EDGES = (1 / 3, 2 / 3, 3 / 2, 3.0)  # h / w; the middle bin holds the near-square boxes
SEARCH_FACTORS = tuple(2 ** (k / 6) for k in range(-18, 7))  # 1/8x … 2x the config's sizes, 1/6 octave steps
SEARCH_SPREADS = (1.5, 2.0, 3.0)  # largest ratio r of a symmetric set {1/r, …, r}
BOX_CHUNK = 2048  # boxes per IoU matrix in the search (memory: chunk x anchors floats)


@dataclass
class GroundTruthBoxes:
    """Ground-truth boxes at the network's input size.

    Attributes:
        image_sizes (list[(int, int)]): (h, w) of each resized image.
        boxes (list[Tensor]): per image (G, 4) XYXY in the resized frame.
        areas (ndarray): (B,) annotation box area w·h in original pixels, over all images.
    """

    image_sizes: List[Tuple[int, int]]
    boxes: List[torch.Tensor]
    areas: np.ndarray

    def all_boxes(self) -> torch.Tensor:
        """(B, 4) every box, images in order."""
        return torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4)


def resized_ground_truth(dataset_dicts: Sequence[Dict], min_size: int, max_size: int) -> GroundTruthBoxes:
    """Boxes of detectron2 dataset dicts (crowd boxes and empty boxes dropped), scaled as
    ``ResizeShortestEdge(min_size, max_size)`` scales the image (``min_size`` 0: unchanged).

    Args:
        dataset_dicts: with "height", "width" and "annotations" ("bbox", "bbox_mode").
        min_size, max_size (int): ``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST`` in px.
    """
    sizes, boxes, areas = [], [], []
    for d in dataset_dicts:
        h, w = d["height"], d["width"]
        new_h, new_w = ResizeShortestEdge.get_output_shape(h, w, min_size, max_size) if min_size > 0 else (h, w)
        xyxy = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in d.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
        xyxy = torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)  # (G, 4)
        xyxy = xyxy[(xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])]
        areas.append(((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])).numpy())
        sizes.append((new_h, new_w))
        boxes.append(xyxy * torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h]))
    return GroundTruthBoxes(sizes, boxes, np.concatenate(areas) if areas else np.zeros(0))


def random_box_dicts(
    num_images: int, image_size: int, side_range: Tuple[float, float], boxes_per_image: int = 3, seed: int = 0
) -> List[Dict]:
    """A generated box-only dataset (dicts without image files; coverage needs no pixels):
    per square image of ``image_size`` px, boxes whose width and height are each uniform in
    ``side_range`` px, at uniform positions, class 0."""
    rng = np.random.default_rng(seed)
    low, high = side_range
    dicts = []
    for i in range(num_images):
        wh = rng.uniform(low, high, (boxes_per_image, 2))
        xy = rng.uniform(0, image_size - high, (boxes_per_image, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).tolist()
        annotations = [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0} for b in boxes]
        dicts.append({"image_id": i, "height": image_size, "width": image_size, "annotations": annotations})
    return dicts


class AnchorGrid:
    """The anchors a config's model puts on an image of a given size, per FPN level."""

    def __init__(self, cfg: CfgNode):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        self.level_names: List[str] = list(cfg.MODEL.RETINANET.IN_FEATURES)
        self.feature_shapes: List[ShapeSpec] = [shapes[f] for f in self.level_names]
        self.size_divisibility: int = backbone.size_divisibility
        self.generator = build_anchor_generator(cfg, self.feature_shapes)

    def with_anchors(self, sizes, aspect_ratios) -> "AnchorGrid":
        """The same grid with other anchor sizes and ratios (same generator class)."""
        other = object.__new__(AnchorGrid)
        other.__dict__.update(self.__dict__)
        strides = [s.stride for s in self.feature_shapes]
        other.generator = type(self.generator)(
            sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=self.generator.offset
        )
        return other

    def anchors(self, image_size: Tuple[int, int]) -> List[torch.Tensor]:
        """Per level (HiWiA, 4) XYXY anchors for an (h, w) image, padded as ImageList pads."""
        div = max(self.size_divisibility, 1)
        padded = [math.ceil(x / div) * div for x in image_size]
        features = [
            torch.empty(1, 0, math.ceil(padded[0] / s.stride), math.ceil(padded[1] / s.stride))
            for s in self.feature_shapes
        ]
        return [b.tensor for b in self.generator(features)]


@dataclass
class AnchorCoverage:
    """Per ground-truth box: best anchor IoU, foreground anchors per level, size and shape.

    Attributes:
        best_iou (ndarray): (B,) max IoU over all anchors.
        fg_per_level (ndarray): (B, L) foreground anchors matched to the box on each level.
        side (ndarray): (B,) √(w·h) in input pixels after the resize.
        aspect (ndarray): (B,) h / w.
        area (ndarray): (B,) annotation area in original pixels (for COCO's size bins).
        thresholds (tuple): (background below, foreground from), e.g. (0.4, 0.5).
        level_names (list[str]); sizes, aspect_ratios: the anchors measured.
    """

    best_iou: np.ndarray
    fg_per_level: np.ndarray
    side: np.ndarray
    aspect: np.ndarray
    area: np.ndarray
    thresholds: Tuple[float, float]
    level_names: List[str]
    sizes: List[List[float]] = field(default_factory=list)
    aspect_ratios: List[List[float]] = field(default_factory=list)

    def bands(self, mask: Optional[np.ndarray] = None) -> Tuple[float, float, float]:
        """Shares of the (masked) boxes with best IoU ≥ fg, in [bg, fg), and < bg."""
        iou = self.best_iou if mask is None else self.best_iou[mask]
        if iou.size == 0:
            return (math.nan,) * 3
        low, high = self.thresholds
        fg = float(np.mean(iou >= high))
        below = float(np.mean(iou < low))
        return fg, 1.0 - fg - below, below

    @property
    def foreground_share(self) -> float:
        """Share of all boxes whose best anchor reaches the foreground IoU."""
        return self.bands()[0]

    def groups(self) -> List[Tuple[str, np.ndarray]]:
        """(label, mask) rows of the table and plot: all, COCO sizes, side bins, ratio bins."""
        rows = [("all", np.ones_like(self.side, dtype=bool))]
        rows += [(f"COCO {name}", (self.area >= lo) & (self.area < hi)) for name, lo, hi in COCO_AREA_BINS]
        rows += [(f"side {label} px", mask) for label, mask in _binned(self.side, SIDE_EDGES, "{:.0f}")]
        rows += [(f"h/w {label}", mask) for label, mask in _binned(self.aspect, RATIO_EDGES, "{:.2g}")]
        return rows


def _binned(values: np.ndarray, edges: Sequence[float], fmt: str) -> List[Tuple[str, np.ndarray]]:
    """(label, mask) per bin of ``edges`` (open-ended first and last bins)."""
    bounds = [-math.inf, *edges, math.inf]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        label = f"< {fmt.format(hi)}" if lo == -math.inf else f">= {fmt.format(lo)}" if hi == math.inf else (
            f"{fmt.format(lo)}-{fmt.format(hi)}"
        )
        out.append((label, (values >= lo) & (values < hi)))
    return out


def _match(grid: AnchorGrid, gt: GroundTruthBoxes, matcher) -> Tuple[np.ndarray, np.ndarray]:
    """Best IoU (B,) and foreground anchors per level (B, L), image by image, with the
    model's matcher (boxes of one image compete for anchors, as in training)."""
    best, per_level = [], []
    for size, boxes in zip(gt.image_sizes, gt.boxes):
        if len(boxes) == 0:
            continue
        anchors = grid.anchors(size)
        iou = pairwise_iou(Boxes(boxes), Boxes(torch.cat(anchors)))  # (G, R)
        matches, labels = matcher(iou)  # (R,), (R,)
        sizes = [len(a) for a in anchors]
        counts = [foreground_counts(m, lab, len(boxes)) for m, lab in zip(matches.split(sizes), labels.split(sizes))]
        best.append(iou.max(dim=1).values.numpy())
        per_level.append(torch.stack(counts, dim=1).numpy())  # (G, L)
    num_levels = len(grid.level_names)
    return (
        np.concatenate(best) if best else np.zeros(0),
        np.concatenate(per_level) if per_level else np.zeros((0, num_levels), dtype=np.int64),
    )


def _shape(gt: GroundTruthBoxes) -> Tuple[np.ndarray, np.ndarray]:
    boxes = gt.all_boxes().numpy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.sqrt(w * h), h / w


def _iou_thresholds(cfg: CfgNode) -> Tuple[float, float]:
    """(background below, foreground from) of ``MODEL.RETINANET.IOU_THRESHOLDS``/``IOU_LABELS``."""
    matcher = anchor_matcher_from_config(cfg)
    return min(cfg.MODEL.RETINANET.IOU_THRESHOLDS), foreground_iou_threshold(matcher)


def measure_coverage(cfg: CfgNode, dataset_dicts: Sequence[Dict], grid: Optional[AnchorGrid] = None) -> AnchorCoverage:
    """Coverage of ``dataset_dicts``' boxes by the anchors of ``cfg`` (module docstring).

    Args:
        cfg: a RetinaFocal config (anchors, IoU rule, test-time resize, backbone strides).
        dataset_dicts: detectron2 dataset dicts with annotations.
        grid: the anchor grid of ``cfg`` if already built (building it builds the backbone).
    """
    grid = grid or AnchorGrid(cfg)
    gt = resized_ground_truth(dataset_dicts, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    best_iou, fg_per_level = _match(grid, gt, anchor_matcher_from_config(cfg))
    side, aspect = _shape(gt)
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    return AnchorCoverage(
        best_iou, fg_per_level, side, aspect, gt.areas, _iou_thresholds(cfg), grid.level_names,
        [list(map(float, s)) for s in anchors.SIZES], [list(map(float, r)) for r in anchors.ASPECT_RATIOS],
    )


def symmetric_ratios(count: int, spread: float) -> List[float]:
    """``count`` aspect ratios spaced evenly in log from 1/spread to spread ([1.0] for one),
    rounded to 3 decimals as they are printed."""
    if count == 1:
        return [1.0]
    return [round(float(r), 3) for r in np.exp(np.linspace(-math.log(spread), math.log(spread), count))]


def _best_ious(grid: AnchorGrid, gt: GroundTruthBoxes) -> np.ndarray:
    """(B,) best anchor IoU of every box (no matcher: the search only needs this)."""
    by_size: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    order: Dict[Tuple[int, int], List[int]] = {}
    start = 0
    for size, boxes in zip(gt.image_sizes, gt.boxes):
        by_size.setdefault(size, []).append(boxes)
        order.setdefault(size, []).extend(range(start, start + len(boxes)))
        start += len(boxes)
    best = np.zeros(start)
    for size, boxes in by_size.items():
        anchors = Boxes(torch.cat(grid.anchors(size)))
        boxes = torch.cat(boxes)
        values = [pairwise_iou(Boxes(chunk), anchors).max(dim=1).values for chunk in boxes.split(BOX_CHUNK)]
        best[order[size]] = torch.cat(values).numpy() if values else []
    return best


def _round_sizes(sizes: Sequence[Sequence[float]]) -> List[List[float]]:
    return [[round(float(s), 1) for s in level] for level in sizes]


def propose_anchors(
    cfg: CfgNode,
    dataset_dicts: Sequence[Dict],
    factors: Sequence[float] = SEARCH_FACTORS,
    spreads: Sequence[float] = SEARCH_SPREADS,
    grid: Optional[AnchorGrid] = None,
) -> Tuple[List[List[float]], List[List[float]], float]:
    """Anchor sizes and ratios of the config's structure that cover the dataset's boxes best.

    The search is a grid over two numbers:

    * a factor f that multiplies every anchor size of the config (so the per-level octave
      structure and the number of scales per level stay; ``SEARCH_FACTORS``: 1/8x to 2x in
      steps of 2^(1/6));
    * the aspect-ratio set: the config's own, or A ratios spaced evenly in log between 1/r
      and r (``SEARCH_SPREADS`` r = 1.5, 2, 3; A = the config's number of ratios; the
      same set on every level).

    Each candidate is scored by the share of boxes whose best anchor IoU reaches the
    foreground threshold; ties go to the higher mean best IoU, then to the factor closest
    to 1. Sizes are rounded to 0.1 px, as they are printed.

    Returns:
        sizes (list[list[float]]), aspect_ratios (list[list[float]]), and the share of
        boxes at or above the foreground IoU with them.
    """
    grid = grid or AnchorGrid(cfg)
    gt = resized_ground_truth(dataset_dicts, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    fg_iou = _iou_thresholds(cfg)[1]
    base_sizes = [list(map(float, s)) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    own_ratios = [list(map(float, r)) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS]
    num_ratios = len(own_ratios[0])
    ratio_sets = [own_ratios] + [[symmetric_ratios(num_ratios, r)] for r in spreads]
    best_key, best = None, None
    for ratios in ratio_sets:
        for f in factors:
            sizes = _round_sizes([[s * f for s in level] for level in base_sizes])
            iou = _best_ious(grid.with_anchors(sizes, ratios), gt)
            key = (round(float(np.mean(iou >= fg_iou)), 6), round(float(np.mean(iou)), 6), -abs(math.log(f)))
            if best_key is None or key > best_key:
                best_key, best = key, (sizes, ratios)
    return best[0], best[1], best_key[0]


def fit_anchors(cfg: CfgNode) -> str:
    """``--fit-anchors``: set ``cfg``'s ``MODEL.ANCHOR_GENERATOR`` sizes and ratios (in place)
    to :func:`propose_anchors`' proposal for the boxes of ``DATASETS.TRAIN``.

    Returns:
        str: the share of boxes at the foreground IoU before and after, and the new anchors
        (for the log).
    """
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    grid = AnchorGrid(cfg)
    before = measure_coverage(cfg, dicts, grid).foreground_share
    sizes, ratios, after = propose_anchors(cfg, dicts, grid=grid)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = ratios
    return (
        f"--fit-anchors on {list(cfg.DATASETS.TRAIN)}: boxes with an anchor at IoU >= {_iou_thresholds(cfg)[1]:g} "
        f"{before:.1%} -> {after:.1%} with\n{anchor_config_lines(sizes, ratios)}"
    )


def with_anchors(cfg: CfgNode, sizes, aspect_ratios) -> CfgNode:
    """A copy of ``cfg`` with these ``MODEL.ANCHOR_GENERATOR`` sizes and ratios."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(s) for s in sizes]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(r) for r in aspect_ratios]
    return cfg


def anchor_config_lines(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]) -> str:
    """YAML to paste into a config for these anchors."""
    as_list = lambda xs: "[" + ", ".join("[" + ", ".join(f"{round(v, 3):g}" for v in x) + "]" for x in xs) + "]"  # noqa: E731
    return (
        "MODEL:\n"
        "  ANCHOR_GENERATOR:\n"
        f"    SIZES: {as_list(sizes)}\n"
        f"    ASPECT_RATIOS: {as_list(aspect_ratios)}\n"
    )


def coverage_table(result: AnchorCoverage, min_boxes: int = 1) -> str:
    """A text table: per group of boxes, their count, the three IoU bands, the mean best IoU
    and the mean foreground anchors per box (all levels, then each level)."""
    low, high = result.thresholds
    levels = "  ".join(f"{n:>5}" for n in result.level_names)
    header = (
        f"{'boxes':<18}{'n':>7}  {f'>={high:g}':>6}  {f'{low:g}-{high:g}':>7}  {f'<{low:g}':>6}  "
        f"{'IoU':>5}  {'fg/box':>6}  {levels}"
    )
    lines = [header, "-" * len(header)]
    for label, mask in result.groups():
        n = int(mask.sum())
        if n < min_boxes:
            continue
        fg, ignore, below = result.bands(mask)
        per_level = result.fg_per_level[mask].mean(axis=0)
        cells = "  ".join(f"{v:5.2f}" for v in per_level)
        lines.append(
            f"{label:<18}{n:>7}  {fg:6.1%}  {ignore:7.1%}  {below:6.1%}  {result.best_iou[mask].mean():5.2f}  "
            f"{per_level.sum():6.2f}  {cells}"
        )
    return "\n".join(lines)
