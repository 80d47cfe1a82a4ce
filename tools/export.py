#!/usr/bin/env python
"""Export a trained RetinaFocal (normalization, backbone, head, anchors) with torch.export.

    python tools/export.py --format pt2 --config-file C.yaml --output out/export \\
        MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Writes ``OUTPUT/model.pt2`` (an ``ExportedProgram``: ``torch.export.load``) or
``OUTPUT/model.onnx`` (the ``torch.export``-based ONNX exporter, opset
``retina_focal.export.ONNX_OPSET``), and ``OUTPUT/config.yaml``, the config that the Python
post-processing needs. What goes in and out and how to post-process are in
``retina_focal/export.py`` and docs/getting_started.md. The program is exported on
``--sample-image`` (default: a blank image of ``INPUT.MIN_SIZE_TEST`` pixels square); H and W
are dynamic when its padded sides are at least twice the largest feature stride (256 px for
P7), else the program serves that size only.
"""
import argparse
import os
import sys

import cv2
import numpy as np

from retina_focal.engine import load_config
from retina_focal.export import (
    ExportableRetinaFocal,
    export_dynamic_shapes,
    export_onnx,
    export_program,
    padded_for_export,
)
from retina_focal.predict import load_model, model_input

EXPORTERS = {"pt2": ("model.pt2", export_program), "onnx": ("model.onnx", export_onnx)}


def _sample_image(cfg, path):
    """(H, W, 3) uint8 BGR: the image at ``path``, or a blank square of MIN_SIZE_TEST pixels."""
    if path is None:
        side = cfg.INPUT.MIN_SIZE_TEST
        return np.zeros((side, side, 3), dtype=np.uint8)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"--sample-image {path!r} cannot be read as an image")
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export RetinaFocal with torch.export (.pt2) or to ONNX.")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--sample-image", metavar="FILE", help="image to trace on (default: blank)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, e.g. MODEL.WEIGHTS w.pth")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    try:
        model = load_model(cfg)
        sample = model_input(cfg, _sample_image(cfg, args.sample_image))[None]  # (1, 3, H, W)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    file_name, export = EXPORTERS[args.format]
    exportable = ExportableRetinaFocal(model)
    path = export(exportable, sample, os.path.join(args.output, file_name))
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    padded = tuple(padded_for_export(model, sample).shape)
    sizes = "dynamic H and W" if export_dynamic_shapes(exportable, padded_for_export(model, sample)) else f"{padded} inputs only"
    print(f"exported {args.format} to {path} ({sizes}; input padded by retina_focal.export.padded_for_export); "
          f"config: {args.output}/config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
