#!/usr/bin/env python
"""AP and speed of every inference backend on a test set: one ``train_net.py --eval-only`` per
backend and precision, each with an empty program cache, so its time includes building them.

    python tools/compare_backends.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \\
        --output-dir output/compare_backends MODEL.WEIGHTS output/shapes_demo/model_final.pth

Prints and writes ``OUTPUT/results.md``: per backend the COCO AP / AP50, the AP difference
to eager float32, detectron2's steady inference time per image (``inference_on_dataset``,
which leaves out the first images: the build), and the wall time of the whole command
(start, model, program build, inference, COCO evaluation) with the images per second it
gives. ``--backends`` picks the rows; ``eager-bfloat16`` and ``compiled-bfloat16`` add
``TEST.AMP`` (emulated, and slow, on a CPU without AVX512-BF16 or AMX); ``compiled-int8`` needs
torchao; ``auto`` is ``TEST.BACKEND.NAME auto``, and its row names what it chose.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from retina_focal.utils.cpu import cpu_description  # noqa: E402

AMP = ["TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", "bfloat16"]
BACKENDS = {  # name: (train_net.py flags, config overrides)
    "eager": ([], []),
    "compiled": (["--backend", "compiled"], []),
    "onnxruntime": (["--backend", "onnxruntime"], []),
    "onnxruntime-int8": (["--backend", "onnxruntime-int8"], []),
    "compiled-int8": (["--backend", "compiled-int8"], []),
    "eager-bfloat16": ([], AMP),
    "compiled-bfloat16": (["--backend", "compiled"], AMP),
    "auto": (["--backend", "auto"], []),
}
DEFAULT_BACKENDS = ["eager", "compiled", "onnxruntime", "onnxruntime-int8", "compiled-int8", "auto"]


def run_backend(args, name: str) -> Dict:
    """One --eval-only run: {"AP", "AP50", "s_per_image", "images", "wall_s"} from its log."""
    out = os.path.join(args.output_dir, name)
    shutil.rmtree(out, ignore_errors=True)  # an empty cache: the build is part of the time
    flags, opts = BACKENDS[name]
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", args.config_file, "--eval-only", *flags,
           *args.opts, *opts, "OUTPUT_DIR", out]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{log[-3000:]}")
    ap = re.findall(r"copypaste: ([\d.nan]+),([\d.nan]+),", log)
    timing = re.search(r"Total inference time: \S+ \(([\d.]+) s / iter per device", log)
    images = re.search(r"Start inference on (\d+) batches", log)
    chosen = re.search(r"TEST.BACKEND.NAME auto: (.*?) \(", log)
    return {"AP": float(ap[0][0]), "AP50": float(ap[0][1]), "s_per_image": float(timing.group(1)),
            "images": int(images.group(1)), "wall_s": wall, "chosen": chosen.group(1) if chosen else ""}


def table(rows: Dict[str, Dict]) -> List[str]:
    ref = rows.get("eager")
    lines = ["| backend | AP | AP50 | AP − eager | s / image (steady) | wall s (incl. build, eval) | images / s (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        delta = f"{r['AP'] - ref['AP']:+.2f}" if ref else ""
        label = f"{name} ({r['chosen']})" if r.get("chosen") else name
        lines.append(f"| {label} | {r['AP']:.2f} | {r['AP50']:.2f} | {delta} | {r['s_per_image']:.4f} | {r['wall_s']:.1f} "
                     f"| {r['images'] / r['wall_s']:.2f} |")
    return lines


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output-dir", default="output/compare_backends")
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=DEFAULT_BACKENDS,
                        help="rows to run (give another option after the list: the config KEY VALUE pairs come last)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs, e.g. MODEL.WEIGHTS w.pth")
    args = parser.parse_args(argv)
    rows = {}
    for name in args.backends:
        rows[name] = run_backend(args, name)
        print(f"{name}: {rows[name]}", flush=True)
    text = "\n".join([f"`python tools/compare_backends.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
                      cpu_description(), "", *table(rows)]) + "\n"
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(main())
