#!/usr/bin/env python
"""The checks that need a GPU, sized for scarce GPU time (`make gpu-check`).

    python tools/gpu_check.py --output-dir output/gpu_check     # on a machine with CUDA: <= 8 minutes
    python tools/gpu_check.py --quick ...                       # the same sections, fewer rounds: <= 3 minutes
    python tools/gpu_check.py --device cpu --tiny ...           # the same code on a CPU, tiny sizes (tests)

Each section prints its rows as it goes and ``gpu_check.md`` is rewritten after each one, so a
run cut short still leaves what it measured; a section that raises is recorded as an ERROR row
(and the exit status is 1) and the next section still runs.

1. **Parity on the device**: detectron2's ``RetinaNet`` and ``RetinaFocal`` with the same
   weights (R-50-FPN, 80 classes, output convs redrawn so there are detections) on the same
   two images: same classes, largest score and box difference, with the speed-ups on
   (channels-last, folded frozen BN) and off.
2. **AMP training**: ``--iters`` iterations with ``SOLVER.AMP.ENABLED`` (float16 + GradScaler,
   :class:`retina_focal.engine.amp.MixedPrecisionTrainer`), in float32, and with AMP and
   ``SOLVER.COMPILE.ENABLED`` (torch.compile's fused kernels) from the same weights on the same
   synthetic batches: losses, the GradScaler's scale, skipped steps, time per step.
3. **Speed**: ``tools/benchmark.py``'s loss, train and inference sections on the device (CUDA
   synchronized around every timing): the focal loss (120k anchors x 80, fwd + bwd) against
   fvcore's; a training step (batch 8 @ 800 px) and inference (batch 1 @ 800 px) against
   detectron2's RetinaNet, with RetinaFocal under AMP as a third row.

Writes ``gpu_check.md`` (and the benchmark's ``results.md``/``results.csv``) to
``--output-dir``. Without CUDA (and without ``--device cpu``) it says so and exits 0.
"""
import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from retina_focal.config.load import load_config  # noqa: E402
from retina_focal.engine.amp import MixedPrecisionTrainer
from retina_focal.engine.compile import compile_dense_network
from retina_focal.utils.cpu import cpu_description  # noqa: E402
from retina_focal.utils.testing import (
    build_detectron2_twin,
    make_detections_nontrivial,
    paired_detection_rows,
    random_images,
    synthetic_batch,
)
from tools import benchmark  # noqa: E402

CONFIG = "configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml"
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64"]
# Tolerances of the parity check (float32, TF32 off): with the speed-ups on, other kernels
# round differently; with them off the kernels are the same and only the sigmoid of the kept
# logits may round differently.
SCORE_TOL, BOX_TOL_PX = 1e-3, 0.1
STD_INPUTS = ["MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]  # unit-variance inputs: no ImageNet weights here


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=CONFIG)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="ResNet-18, 64 px, 3 iterations: a test of this script")
    p.add_argument("--quick", action="store_true", help="10 training iterations, 2 timed rounds: <= 3 minutes on one GPU")
    p.add_argument("--iters", type=int, help="training iterations per precision (default 50; 10 with --quick)")
    p.add_argument("--output-dir", default="output/gpu_check")
    return p.parse_args(argv)


def _sizes(args) -> Dict[str, int]:
    """Image side, batch, training iterations per precision, timed rounds, focal-loss anchors."""
    if args.tiny:
        sizes = {"image": 64, "train_batch": 2, "iters": 3, "rounds": 1, "loss_anchors": 3000}
    elif args.quick:
        sizes = {"image": 800, "train_batch": 8, "iters": 10, "rounds": 2, "loss_anchors": 120_000}
    else:
        sizes = {"image": 800, "train_batch": 8, "iters": 50, "rounds": 5, "loss_anchors": 120_000}
    if args.iters is not None:
        sizes["iters"] = args.iters
    return sizes


def _cfg(args, *opts):
    return load_config(args.config_file, ["MODEL.DEVICE", args.device, *(TINY if args.tiny else []), *STD_INPUTS, *opts])


def machine_description(device: torch.device) -> str:
    gpu = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
    return f"{gpu}torch {torch.__version__}; CPU: {cpu_description()}"


@contextlib.contextmanager
def _no_tf32():
    """float32 convolutions and matmuls on CUDA (PyTorch runs cuDNN convs in TF32 by default,
    whose 10-bit mantissa would hide a real difference between the two implementations)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
@_no_tf32()
def check_parity(args, sizes) -> List[str]:
    """Markdown rows: speed-ups, detections, same classes, max score / box difference, pass."""
    side = sizes["image"]
    images = random_images([(side, int(side * 1.25)), (int(side * 0.75), side)], seed=3)
    inputs = [{"image": im} for im in images]
    rows = []
    for speed_ups in (True, False):
        cfg = _cfg(args, "MODEL.RETINA_FOCAL.CHANNELS_LAST", str(speed_ups), "MODEL.RETINA_FOCAL.FOLD_FROZEN_BN", str(speed_ups))
        torch.manual_seed(0)
        theirs = build_detectron2_twin(cfg).eval()
        make_detections_nontrivial(theirs, inputs)
        ours = build_model(cfg).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        count, same, score_diff, box_diff = 0, True, 0.0, 0.0
        for a, b in zip(ours(inputs), theirs(inputs)):
            x, y = paired_detection_rows(a["instances"].to("cpu"), b["instances"].to("cpu"))
            same = same and len(x) == len(y) and torch.equal(x[:, 1], y[:, 1])
            if len(x) and len(x) == len(y):
                score_diff = max(score_diff, (x[:, 0] - y[:, 0]).abs().max().item())
                box_diff = max(box_diff, (x[:, 2:] - y[:, 2:]).abs().max().item())
            count += len(x)
        ok = same and count > 0 and score_diff <= SCORE_TOL and box_diff <= BOX_TOL_PX
        rows.append(f"| {'on' if speed_ups else 'off'} | {count} | {'yes' if same else 'no'} | {score_diff:.1e} "
                    f"| {box_diff:.1e} | {'PASS' if ok else 'FAIL'} |")
        print(f"[parity] speed-ups {speed_ups}: {rows[-1]}", flush=True)
    return rows


def _batches(cfg, sizes, count: int = 4):
    """An endless cycle over ``count`` fixed synthetic training batches."""
    batches = [
        synthetic_batch(sizes["train_batch"], sizes["image"], cfg.MODEL.RETINANET.NUM_CLASSES, seed=s) for s in range(count)
    ]
    return itertools.cycle(batches)


def train_losses(args, sizes, precision: Optional[torch.dtype], compiled: bool = False) -> Dict[str, List[float]]:
    """Per-iteration total loss and seconds (and, for float16, the scale and skipped steps) of
    ``iters`` SGD steps from the same initial weights on the same batches; ``compiled``: with
    ``SOLVER.COMPILE.ENABLED`` (backbone and head under torch.compile)."""
    cfg = _cfg(args)
    torch.manual_seed(0)
    model = build_model(cfg)
    if compiled:
        compile_dense_network(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = _batches(cfg, sizes)
    if precision is None:
        trainer = SimpleTrainer(model, loader, optimizer)
    else:
        trainer = MixedPrecisionTrainer(model, loader, optimizer, device_type=model.device.type, precision=precision)
    steps = []
    with EventStorage() as storage:
        for it in range(sizes["iters"]):
            storage.iter = trainer.iter = it
            benchmark._sync(model.device)
            start = time.perf_counter()
            trainer.run_step()
            benchmark._sync(model.device)
            steps.append(time.perf_counter() - start)
            storage.step()
    history = storage.histories()
    out = {"total_loss": [v for v, _ in history["total_loss"].values()], "seconds": [sum(steps)],
           "step_ms": [1000 * statistics.median(steps[len(steps) // 2:])]}  # steady state: the second half
    for key in ("amp/grad_scale", "amp/skipped_steps"):
        if key in history:
            out[key] = [v for v, _ in history[key].values()]
    return out


def amp_training_rows(args, sizes) -> List[str]:
    float32 = train_losses(args, sizes, None)
    float16 = train_losses(args, sizes, torch.float16)
    compiled = train_losses(args, sizes, torch.float16, compiled=True)
    n = len(float32["total_loss"])
    tail = max(1, n // 5)
    rows = []
    for name, run in (("float32", float32), ("AMP float16", float16), ("AMP float16 + SOLVER.COMPILE", compiled)):
        losses = run["total_loss"]
        scales = run.get("amp/grad_scale", [])
        skipped = int(run["amp/skipped_steps"][-1]) if "amp/skipped_steps" in run else 0
        scale_text = f"{scales[0]:.0f} → {scales[-1]:.0f}" if scales else "–"
        rows.append(f"| {name} | {losses[0]:.4f} | {statistics.mean(losses[-tail:]):.4f} | {scale_text} | {skipped} "
                    f"| {run['seconds'][0]:.1f} | {run['step_ms'][0]:.1f} |")
        print(f"[amp] {rows[-1]}", flush=True)
    relative = [abs(a - b) / abs(b) for a, b in zip(float16["total_loss"], float32["total_loss"])]
    rows.append(f"\nlargest per-iteration |AMP − float32| / float32 of the total loss: {max(relative):.2%} "
                f"(median {statistics.median(relative):.2%}) over {n} iterations")
    compile_diff = max(abs(a - b) / abs(b) for a, b in zip(compiled["total_loss"], float16["total_loss"]))
    rows.append(f"\nlargest per-iteration |compiled − eager| / eager of the AMP total loss: {compile_diff:.2%}")
    return rows


def speed_table(args, sizes) -> str:
    out = os.path.join(args.output_dir, "benchmark")
    argv = ["--device", args.device, "--config-file", args.config_file, "--sections", "loss", "train", "inference",
            "--train-size", str(sizes["image"]), "--train-batch", str(sizes["train_batch"]), "--amp", "on",
            "--rounds", str(sizes["rounds"]), "--loss-anchors", str(sizes["loss_anchors"]), "--output-dir", out]
    if args.tiny:
        argv += ["--threads", "1", *TINY]
    return benchmark.main(argv)


def _run_section(name: str, fn, *fn_args):
    """``fn``'s result and None, or an ERROR line and the error's text when it raises (the
    check goes on with the next section: GPU time is too scarce to lose the rest of a run)."""
    start = time.perf_counter()
    print(f"[{name}] started", flush=True)
    try:
        result, error = fn(*fn_args), None
    except Exception as e:  # noqa: BLE001 - recorded in the report and the exit status
        traceback.print_exc()
        result, error = None, f"ERROR in {name}: {type(e).__name__}: {e}"
    print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    return result, error


def report_text(args, argv, device, sizes, parity, amp, speed, seconds: float) -> str:
    """gpu_check.md: the sections measured so far (a missing one reads "not run")."""
    def body(rows, error):
        if error:
            return [f"**{error}**"]
        return rows if rows is not None else ["not run"]

    return "\n".join([
        f"# GPU check: `python tools/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "", f"Machine: {machine_description(device)}. Config: {args.config_file}{' (tiny)' if args.tiny else ''}.", "",
        f"## 1. Parity with detectron2's RetinaNet on {args.device} (same weights, 2 images)", "",
        f"Tolerances: classes equal, scores within {SCORE_TOL:g}, boxes within {BOX_TOL_PX:g} px.", "",
        "| speed-ups | detections | same classes | max score diff | max box diff (px) | |", "|---|---:|---|---:|---:|---|",
        *body(*parity), "",
        f"## 2. Training, {sizes['iters']} iterations, batch {sizes['train_batch']} @ {sizes['image']} px, same start and batches",
        "", "| precision | first loss | mean loss, last 20 % | GradScaler scale (first → last) | skipped steps | seconds "
        "(all steps) | ms per step (median, second half) |",
        "|---|---:|---:|---|---:|---:|---:|", *body(*amp), "",
        "## 3. Speed (tools/benchmark.py on the device)", "", *body([speed[0]] if speed[0] else None, speed[1]),
        f"Whole check: {seconds:.0f} s.",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0). "
              "Run it where `torch.cuda.is_available()` is True, or with --device cpu --tiny to test the script.")
        return 0
    sizes = _sizes(args)
    start = time.perf_counter()
    print(f"gpu_check on {machine_description(device)}; sizes {sizes}", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "gpu_check.md")
    results = {"parity": (None, None), "amp": (None, None), "speed": (None, None)}
    for name, fn in (("parity", check_parity), ("amp", amp_training_rows), ("speed", speed_table)):
        results[name] = _run_section(name, fn, args, sizes)
        text = report_text(args, argv, device, sizes, results["parity"], results["amp"], results["speed"],
                           time.perf_counter() - start)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text + f"\nwritten to {path}")
    failed = any(error for _, error in results.values()) or any("FAIL" in row for row in results["parity"][0] or [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
