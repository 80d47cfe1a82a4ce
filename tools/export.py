#!/usr/bin/env python
"""Export a trained RetinaFocal (normalization, backbone, head, anchors) with torch.export.

    python tools/export.py --format pt2 --config-file C.yaml --output out/export \\
        MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

    python tools/export.py --backend onnxruntime-int8 --config-file C.yaml --output out/deploy \\
        MODEL.WEIGHTS model_final.pth

Writes ``OUTPUT/model.pt2`` (an ``ExportedProgram``: ``torch.export.load``) or
``OUTPUT/model.onnx`` (the ``torch.export``-based ONNX exporter, opset
``retina_focal.export.ONNX_OPSET``), and ``OUTPUT/config.yaml``, the config that the Python
post-processing needs. With ``--backend`` (compiled, onnxruntime, onnxruntime-int8;
retina_focal/backends.py) it builds that backend's programs for the sample image's size into
OUTPUT and writes a config.yaml with ``TEST.BACKEND.NAME`` and ``TEST.BACKEND.CACHE_DIR``
OUTPUT: ``retina-focal-predict`` or ``--eval-only`` with that config load them instead of
building them. What goes in and out and how to post-process are in
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

from retina_focal.config.load import load_config
from retina_focal.export import (
    ExportableRetinaFocal,
    export_dynamic_shapes,
    export_onnx,
    export_program,
    padded_for_export,
)
from retina_focal.export.backends import (
    add_backend_argument,
    backend_opts,
    build_inference_model,
    check_backend_settings,
)
from retina_focal.export.predictor import load_inference_model, model_input

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


def _build_backend(cfg, model, sample, output: str) -> int:
    """Build the programs of ``cfg``'s backend for ``sample``'s size into ``output``."""
    if cfg.TEST.BACKEND.NAME == "eager":
        print("error: --backend eager has nothing to build; export it with --format", file=sys.stderr)
        return 2
    build_inference_model(cfg, model).network(padded_for_export(model, sample))
    with open(os.path.join(output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    built = sorted(f for f in os.listdir(output) if f != "config.yaml" and not f.startswith("."))
    print(f"built the {cfg.TEST.BACKEND.NAME} backend{' (int8)' if cfg.TEST.BACKEND.INT8 else ''} in {output}: "
          f"{', '.join(built)}; config: {output}/config.yaml (TEST.BACKEND.CACHE_DIR names this folder: "
          "after moving it, set the key to the new place)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export RetinaFocal with torch.export (.pt2) or to ONNX.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--format", choices=sorted(EXPORTERS))
    add_backend_argument(target)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--sample-image", metavar="FILE", help="image to trace on (default: blank)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, e.g. MODEL.WEIGHTS w.pth")
    args = parser.parse_args(argv)
    backend = backend_opts(args) + (["TEST.BACKEND.CACHE_DIR", os.path.abspath(args.output)] if args.backend else [])
    cfg = load_config(args.config_file, backend + args.opts, for_inference=True)
    try:
        check_backend_settings(cfg)
        model = load_inference_model(cfg, backend=False)
        sample = model_input(cfg, _sample_image(cfg, args.sample_image))[None]  # (1, 3, H, W)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend:  # errors while building name the backend and the file (retina_focal/backends.py)
        return _build_backend(cfg, model, sample, args.output)
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
