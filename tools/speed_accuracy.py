#!/usr/bin/env python
"""Speed against accuracy on this CPU, as the paper's Figure 2 draws it for a GPU: COCO AP of
each trained model on a test set against its milliseconds per image (batch 1), one point per
test size, eager (and each of ``--backends``, ``TEST.BACKEND.NAME``) in float32 and, on a CPU
with bfloat16 kernels (AVX512-BF16, AMX), under bfloat16 autocast (``TEST.AMP``). A model given
without weights is timed only (e.g. R-50-FPN, drawn as vertical lines).

    python tools/speed_accuracy.py --sizes 96 128 160 --backends compiled --output docs/figures/speed_accuracy_cpu.png \\
        --model "MobileNetV2-FPN, ImageNet=configs/Shapes-Detection/retina_focal_MobileNetV2_FPN_demo.yaml:output/shapes_demo_mobilenet_v2/model_final.pth" \\
        --model "R-18-FPN, scratch=configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml:output/shapes_demo/model_final.pth" \\
        --model "R-50-FPN=configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml"

The time is the model's forward on one preprocessed image (what ``DefaultPredictor`` feeds it),
post-processing included, median over ``--timed-images`` images after a warm-up call. The
AP is COCOEvaluator's on ``--dataset`` at that test size. Writes the PNG and, beside it, a
Markdown table of every run; the picture draws, per model, eager float32 and its fastest other
run. The title names the CPU.
"""
import argparse
import itertools
import os
import shlex
import statistics
import tempfile
import textwrap
import sys
from typing import Dict, List, Optional, Tuple

import cv2
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from retina_focal.config.load import load_config  # noqa: E402
from retina_focal.data import register_builtin_shapes  # noqa: E402
from retina_focal.engine.trainer import RetinaFocalTrainer  # noqa: E402
from retina_focal.export.backends import build_inference_model  # noqa: E402
from retina_focal.export.predictor import load_inference_model, model_input  # noqa: E402
from retina_focal.utils.cpu import cpu_description, cpu_has_bf16_kernels  # noqa: E402
from retina_focal.utils.visualize import new_figure, save_figure  # noqa: E402
from tools.benchmark import race  # noqa: E402

Row = Dict[str, object]


def parse_model(text: str) -> Tuple[str, str, Optional[str]]:
    """``"label=config.yaml[:weights.pth]"`` -> (label, config, weights or None)."""
    label, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected LABEL=CONFIG[:WEIGHTS]")
    config, _, weights = rest.partition(":")
    return label, config, weights or None


def model_cfg(config: str, size: int, backend: str, bf16: bool, dataset: str, num_classes: int, output_dir: str):
    return load_config(config, ["TEST.BACKEND.NAME", backend,
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RETINANET.NUM_CLASSES", num_classes,
        "DATASETS.TRAIN", (), "DATASETS.TEST", (dataset,), "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size,
        "TEST.AMP.ENABLED", bf16, "TEST.AMP.PRECISION", "bfloat16", "OUTPUT_DIR", output_dir,
    ])


def ms_per_image(cfg, models: List, images: List) -> List[float]:
    """Median forward time (ms) of each of ``models`` on the ``images`` (BGR), batch 1: one
    round per image in which every model runs once (tools/benchmark.py's ``race``), so a change
    of the machine's speed hits them alike."""
    inputs = [{"image": model_input(cfg, im), "height": im.shape[0], "width": im.shape[1]} for im in images]

    def on_next_image(model):
        stream = itertools.cycle(inputs)  # each model sees the images in the same order
        return lambda: model([next(stream)])

    with torch.no_grad():
        times = race({i: on_next_image(m) for i, m in enumerate(models)}, len(inputs), torch.device("cpu"))
    return [statistics.median(times[i]) * 1000 for i in range(len(models))]


def measure(args) -> List[Row]:
    dataset_dicts = DatasetCatalog.get(args.dataset)
    images = [cv2.imread(d["file_name"]) for d in dataset_dicts[: args.timed_images]]
    num_classes = len(MetadataCatalog.get(args.dataset).thing_classes)  # set when the dicts load
    precisions = [False, True] if cpu_has_bf16_kernels() or args.bf16 else [False]
    runs = [(backend, bf16) for backend in ["eager"] + args.backends for bf16 in precisions]
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed_accuracy_") as scratch:  # COCOEvaluator's files, compiled programs
        for (label, config, weights), size in itertools.product(args.model, args.sizes):
            models, points = [], []
            for backend, bf16 in runs:
                cfg = model_cfg(config, size, backend, bf16, args.dataset, num_classes, scratch)
                model = load_inference_model(cfg, weights) if weights else build_inference_model(cfg, build_model(cfg).eval())
                ap = None
                if weights:
                    results = RetinaFocalTrainer.test(cfg, model)
                    ap = results.get(args.dataset, results)["bbox"]["AP"]  # one test set: not nested
                models.append(model)
                points.append({"model": label, "size": size, "run": f"{backend} {'bfloat16' if bf16 else 'float32'}", "AP": ap})
            for point, ms in zip(points, ms_per_image(cfg, models, images)):  # same input size for every run
                point["ms"] = ms
                print(point, flush=True)
            rows += points
    return rows


def table(rows: List[Row]) -> str:
    lines = ["| model | test size | backend, precision | ms / image | AP |", "|---|---:|---|---:|---:|"]
    for r in rows:
        ap = "time only" if r["AP"] is None else f"{r['AP']:.1f}"
        lines.append(f"| {r['model']} | {r['size']} | {r['run']} | {r['ms']:.1f} | {ap} |")
    return "\n".join(lines) + "\n"


def plotted_runs(rows: List[Row]) -> List[Tuple[str, str]]:
    """(model, run) pairs to draw: per trained model eager float32 and its fastest other run
    (lowest total time over the sizes); per timed-only model its fastest run."""
    pairs = []
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]
        total = {run: sum(r["ms"] for r in mine if r["run"] == run) for run in dict.fromkeys(r["run"] for r in mine)}
        others = {run: t for run, t in total.items() if run != "eager float32"} or total
        fastest = min(others, key=others.get)
        timed_only = mine[0]["AP"] is None
        pairs += [(label, fastest)] if timed_only or fastest == "eager float32" else [(label, "eager float32"), (label, fastest)]
    return pairs


def plot(rows: List[Row], output: str, title: str) -> str:
    fig, ax = new_figure(figsize=(7.5, 5))
    styles = {"eager float32": "-o", "eager bfloat16": "--s", "float32": "-^", "bfloat16": "--D"}
    for label, run in plotted_runs(rows):
        series = [r for r in rows if r["model"] == label and r["run"] == run]
        if series[0]["AP"] is None:  # timed only: a vertical line per size
            for r in series:
                ax.axvline(r["ms"], color="grey", linestyle=":" if run.endswith("float32") else "-.", linewidth=1)
                ax.annotate(f"{label} {r['size']} px {run}", (r["ms"], 0.98), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color="grey", va="top", ha="right")
            continue
        style = styles.get(run, styles[run.split()[-1]])
        line, = ax.plot([r["ms"] for r in series], [r["AP"] for r in series], style, label=f"{label}, {run}")
        for r in series:
            ax.annotate(str(r["size"]), (r["ms"], r["AP"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.get_color())
    ax.set_xlabel("inference time per image, batch 1 (ms)")
    ax.set_ylabel("COCO AP")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return save_figure(fig, output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=parse_model, action="append", required=True, help="LABEL=CONFIG[:WEIGHTS]")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160], help="test sizes (short side = long side)")
    parser.add_argument("--dataset", default="retina_focal_shapes_val")
    parser.add_argument("--timed-images", type=int, default=50)
    parser.add_argument("--backends", nargs="*", default=[], help="TEST.BACKEND.NAME values to run besides eager (compiled, onnxruntime)")
    parser.add_argument("--bf16", action="store_true", help="also bfloat16 on a CPU without bfloat16 kernels (emulated, slow)")
    parser.add_argument("--output", default="docs/figures/speed_accuracy_cpu.png")
    args = parser.parse_args(argv)
    register_builtin_shapes()
    torch.manual_seed(0)
    rows = measure(args)
    cpu = cpu_description()
    title = "\n".join([f"RetinaFocal, {args.dataset}, batch 1, {torch.get_num_threads()} threads"] + textwrap.wrap(cpu, 95))
    png = plot(rows, args.output, title)
    md = os.path.splitext(args.output)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"`python tools/speed_accuracy.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n{cpu}\n\n")
        f.write(table(rows))
    print(table(rows))
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
