#!/usr/bin/env python
"""Anchor coverage of a dataset under a config, and anchors that fit it better.

    python tools/anchor_stats.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --output docs/figures/diagnostics_anchor_coverage.png
    # a generated set: 100 images of 64 px with 3 boxes of 8-12 px each, seen at 160 px
    python tools/anchor_stats.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --random-boxes 8 12 --image-size 64 --output docs/figures/diagnostics_anchor_coverage_tiny.png \\
        INPUT.MIN_SIZE_TEST 160 INPUT.MAX_SIZE_TEST 160

For the boxes of ``--dataset`` (default ``DATASETS.TRAIN[0]``), resized as at test time
(``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``): the share whose best anchor IoU is ≥ the
foreground threshold, in the ignore band, or below (``MODEL.RETINANET.IOU_THRESHOLDS``),
by size and aspect ratio, with the foreground anchors per box and per FPN level; then the
search of ``retina_focal.diagnostics.anchor_coverage.propose_anchors``, the proposed config
lines, the same table for them, and a PNG of coverage vs box size before and after.
Trailing ``KEY VALUE`` pairs override the config, as in ``train_net.py``.
"""
import argparse
from typing import Dict, List, Sequence

from detectron2.data import DatasetCatalog

from retina_focal.config.load import load_config
from retina_focal.data import register_config_datasets
from retina_focal.diagnostics import (
    AnchorGrid,
    anchor_config_lines,
    coverage_table,
    measure_coverage,
    propose_anchors,
    with_anchors,
)
from retina_focal.diagnostics.anchor_coverage import random_box_dicts
from retina_focal.diagnostics.plots import plot_anchor_coverage


def anchor_stats(cfg, dicts: List[Dict], name: str, output: str = "", propose: bool = True) -> Dict:
    """Print the coverage tables of ``dicts`` (a dataset called ``name``) and the proposal;
    write the PNG if ``output`` (needs ``propose``).

    Returns:
        dict: "before" and, with ``propose``, "after" (:class:`AnchorCoverage`), "sizes",
        "aspect_ratios" and "config_lines" of the proposal.
    """
    grid = AnchorGrid(cfg)
    before = measure_coverage(cfg, dicts, grid)
    resize = f"test-time resize {cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}"
    print(f"{len(before.best_iou)} boxes of {len(dicts)} images of {name} ({resize})")
    print("\nConfig anchors (sizes rounded):\n" + anchor_config_lines(before.sizes, before.aspect_ratios))
    print(coverage_table(before))
    out = {"before": before}
    if not propose:
        return out
    sizes, ratios, _ = propose_anchors(cfg, dicts, grid=grid)
    after = measure_coverage(with_anchors(cfg, sizes, ratios), dicts, grid.with_anchors(sizes, ratios))
    lines = anchor_config_lines(sizes, ratios)
    high = before.thresholds[1]
    print(f"\nProposed anchors (IoU >= {high:g}: {before.foreground_share:.1%} -> {after.foreground_share:.1%}):")
    print(lines)
    print(coverage_table(after))
    out.update(after=after, sizes=sizes, aspect_ratios=ratios, config_lines=lines)
    if output:
        title = f"Anchor coverage of {name} ({len(before.best_iou)} boxes, {resize})"
        print(f"\nwrote {plot_anchor_coverage(before, after, output, title)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default="", help="registered dataset or coco:/voc:/csv: spec (default DATASETS.TRAIN[0])")
    parser.add_argument("--num-images", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--random-boxes", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="instead of a dataset: boxes with sides uniform in [MIN, MAX] px, 3 per image")
    parser.add_argument("--image-size", type=int, default=64, help="with --random-boxes: square image side, px")
    parser.add_argument("--no-proposal", action="store_true", help="only measure the config's anchors")
    parser.add_argument("--output", default="", help="PNG: coverage vs box size and aspect ratio, before/after")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv: Sequence[str] = None) -> Dict:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    if args.random_boxes:
        low, high = args.random_boxes
        dicts = random_box_dicts(args.num_images or 100, args.image_size, (low, high))
        name = f"{low:g}-{high:g} px boxes in {args.image_size}-px images"
    else:
        name = args.dataset or cfg.DATASETS.TRAIN[0]
        register_config_datasets(cfg, [name])  # a coco:/voc:/csv: spec given to --dataset
        dicts = DatasetCatalog.get(name)
        dicts = dicts[: args.num_images] if args.num_images > 0 else dicts
    return anchor_stats(cfg, dicts, name, args.output, propose=not args.no_proposal)


if __name__ == "__main__":
    main()
