#!/usr/bin/env python
"""Race RetinaFocal against detectron2's RetinaNet: same config, same weights, same inputs.

    python tools/benchmark.py                      # make bench: every section, R-50-FPN, 80 classes
    python tools/benchmark.py --sections loss train --rounds 7

Sections (medians of ``--rounds`` timed rounds after a warm-up; the two implementations
alternate within each round, so machine noise hits both):

* ``loss``: the classification loss alone, forward + backward, 120,000 anchors x 80 classes,
  0.2 % positive anchors: fvcore's ``sigmoid_focal_loss_jit`` (detectron2's), torchvision's,
  ours elementwise (``sigmoid_focal_loss``) and ours fused (``FocalLoss``), with the largest
  difference of value and gradient from fvcore's;
* ``train``: one training step (forward, backward, SGD step), batch 2 at 512x512, 4 boxes
  per image; also RetinaFocal under mixed precision (``--amp``: the autocast and GradScaler
  of ``SOLVER.AMP.ENABLED``);
* ``inference``: batch 1 at 512x512, end to end and split into backbone + FPN, head and
  post-processing (anchors, decode, top-k, NMS, rescaling); also checks that both return
  the same detections (and how far the mixed-precision model's are, ``TEST.AMP.ENABLED``);
* ``backends``: the inference backends (``TEST.BACKEND``, retina_focal/export/backends.py) at batch 1
  and each of ``--backend-sizes``: eager, compiled (AOTInductor) and ONNX Runtime in float32,
  ONNX Runtime int8 and, with torchao, compiled int8 (PT2E into oneDNN), both calibrated on
  ``--calibration-images`` noise images like the inputs (their accuracy is measured on real
  images by tools/compare_backends.py) and, on a CPU with bfloat16 kernels (or
  ``--amp on``), eager and compiled under ``TEST.AMP``; detectron2's float32 RetinaNet is the
  reference, called as ``DefaultPredictor`` calls it. Building the compiled and ONNX programs
  happens once (cached in ``--output-dir``/backend_cache; the time is in the notes) and is not
  in the medians;
* ``memory``: peak memory of a training step above the memory held before it (resident set
  size of a fresh process per implementation, large allocations returned to the system);
* ``scaling``: training step time and peak memory for each image size x batch size.

The header names the CPU and the ISA flags that decide low-precision speed (AVX512-BF16, AMX).
Writes ``results.md`` and ``results.csv`` to ``--output-dir``. Weights are the §4.1
initialization (no download), with the output convs redrawn for the inference section so
there are detections to post-process.
"""
import argparse
import copy
import csv
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model, detector_postprocess  # noqa: E402
from detectron2.structures import Boxes, pairwise_iou  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import sigmoid_focal_loss_jit  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss  # noqa: E402

from retina_focal.config.load import load_config  # noqa: E402
from retina_focal.engine.ema import ModelEMA  # noqa: E402
from retina_focal.export.backends import build_inference_model  # noqa: E402
from retina_focal.modeling.losses import FocalLoss, sigmoid_focal_loss  # noqa: E402
from retina_focal.modeling.precision import amp_dtype, autocast
from retina_focal.utils.cpu import cpu_description, cpu_has_bf16_kernels  # noqa: E402
from retina_focal.utils.testing import (
    build_detectron2_twin,
    make_detections_nontrivial,
    paired_detection_rows,
    random_images,
    synthetic_batch,
)

DEFAULT_CONFIG = "configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml"
SECTIONS = ("loss", "train", "inference", "backends", "memory", "scaling")
OURS, THEIRS, OURS_AMP = "RetinaFocal", "detectron2 RetinaNet", "RetinaFocal AMP (opt-in)"
OURS_EMA = "RetinaFocal + MODEL_EMA"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="MODEL.DEVICE")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (after 1 warm-up)")
    p.add_argument("--scaling-rounds", type=int, default=2)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[384, 512, 640, 800])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--loss-anchors", type=int, default=120_000)
    p.add_argument("--backend-sizes", type=int, nargs="+", default=[512, 800], help="image sides of the backends section")
    p.add_argument("--calibration-images", type=int, default=32, help="int8 calibration images of the backends section")
    p.add_argument("--output-dir", default="output/benchmark")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of one "
                   "training step and one inference of each implementation")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="race RetinaFocal under mixed precision too; auto: on CUDA, and on a CPU with "
                   "bfloat16 kernels (AVX512-BF16 or AMX; elsewhere bfloat16 is emulated and slow)")
    p.add_argument("--amp-precision", default="auto", help="float16 | bfloat16 | auto (as SOLVER.AMP.PRECISION)")
    p.add_argument("--variant", default="", help="'KEY VALUE ...': the train, inference and scaling sections also race "
                   "RetinaFocal with these config keys (e.g. 'MODEL.RETINA_FOCAL.CHANNELS_LAST False'), side by side")
    p.add_argument("--memory-worker", choices=[OURS, THEIRS], help=argparse.SUPPRESS)
    p.add_argument("--shapes", default="", help=argparse.SUPPRESS)  # memory worker: "size:batch,..."
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p.parse_args(argv)


def amp_precision(args) -> Optional[torch.dtype]:
    """The dtype of the mixed-precision rows, or None when ``--amp`` leaves them out."""
    if args.amp == "off" or (args.amp == "auto" and torch.device(args.device).type == "cpu" and not cpu_has_bf16_kernels()):
        return None
    return amp_dtype(args.amp_precision, args.device, "--amp-precision")


def build_pair(args, amp: bool = False):
    """(cfg, {name: model}) with identical weights; with ``amp`` (and ``amp_precision``) also
    RetinaFocal with ``TEST.AMP.ENABLED`` in that precision."""
    cfg = load_config(args.config_file, ["MODEL.DEVICE", args.device, *args.opts])
    torch.manual_seed(0)
    models = {THEIRS: build_detectron2_twin(cfg), OURS: build_model(cfg)}
    precision = amp_precision(args) if amp else None
    if precision is not None:
        amp_cfg = cfg.clone()
        amp_cfg.TEST.AMP.ENABLED = True
        amp_cfg.TEST.AMP.PRECISION = args.amp_precision
        models[OURS_AMP] = build_model(amp_cfg)
    if args.variant:
        variant_cfg = cfg.clone()
        variant_cfg.merge_from_list(args.variant.split())
        models[variant_name(args)] = build_model(variant_cfg)
    for name, model in models.items():
        model.load_state_dict(models[THEIRS].state_dict(), strict=True)
    return cfg, {name: models[name] for name in (OURS, THEIRS, OURS_AMP, variant_name(args)) if name in models}


def variant_name(args) -> str:
    return f"{OURS} [{args.variant}]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: Dict[str, Callable[[], object]], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each function: one warm-up call each, then ``rounds`` rounds in
    which every function runs once, in an order that alternates between rounds."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def train_step_fn(model, inputs, precision: Optional[torch.dtype] = None, ema: Optional[ModelEMA] = None) -> Callable[[], None]:
    """One SGD step on ``inputs``; with ``precision``, as SOLVER.AMP.ENABLED trains: the forward
    under ``torch.autocast(device, precision)``, the loss scaled by a GradScaler for float16;
    with ``ema``, its update after the step (MODEL_EMA.ENABLED)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()
    device_type = model.device.type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)

    def step():
        with EventStorage(), autocast(device_type, precision):
            losses = model(inputs)
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update()

    return step


class Report:
    """Rows of (section, case, implementation, median/min/max ms, ratio to the reference, note)."""

    def __init__(self):
        self.rows: List[Dict] = []

    def add_times(self, section: str, case: str, times: Dict[str, List[float]], reference: str, notes=None):
        ref = statistics.median(times[reference])
        for name, ts in times.items():
            med = statistics.median(ts)
            self.rows.append({
                "section": section, "case": case, "implementation": name,
                "median_ms": round(1e3 * med, 2), "min_ms": round(1e3 * min(ts), 2), "max_ms": round(1e3 * max(ts), 2),
                "ratio": round(med / ref, 3), "peak_mib": "", "note": (notes or {}).get(name, ""),
            })
            print(f"[{section}] {case:28s} {name:30s} median {1e3 * med:9.1f} ms  ratio {med / ref:.3f}", flush=True)

    def add_memory(self, section: str, case: str, peaks: Dict[str, float], reference: str):
        for name, peak in peaks.items():
            self.rows.append({
                "section": section, "case": case, "implementation": name, "median_ms": "", "min_ms": "", "max_ms": "",
                "ratio": round(peak / peaks[reference], 3), "peak_mib": round(peak / 2**20, 1), "note": "",
            })
            print(f"[{section}] {case:28s} {name:30s} peak {peak / 2**20:9.1f} MiB  ratio {peak / peaks[reference]:.3f}", flush=True)

    def write(self, out_dir: str, header: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        lines = [header, "", "| section | case | implementation | median ms | min–max ms | peak MiB | ratio | note |",
                 "|---|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            spread = f"{r['min_ms']}–{r['max_ms']}" if r["median_ms"] != "" else ""
            lines.append(f"| {r['section']} | {r['case']} | {r['implementation']} | {r['median_ms']} | {spread} "
                         f"| {r['peak_mib']} | {r['ratio']} | {r['note']} |")
        text = "\n".join(lines) + "\n"
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(text)
        return text


def bench_loss(args, report: Report, device: torch.device) -> None:
    num_classes, num_anchors = 80, args.loss_anchors
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, num_anchors, num_classes, generator=g) * 2 - 4).to(device)  # p ~ 0.02 on average
    labels = torch.full((1, num_anchors), num_classes, dtype=torch.long)
    positives = torch.randperm(num_anchors, generator=g)[: max(1, num_anchors // 500)]  # 0.2 %
    labels[0, positives] = torch.randint(num_classes, (len(positives),), generator=g)
    labels = labels.to(device)
    targets = F.one_hot(labels[0], num_classes + 1)[:, :num_classes].float()  # (R, K), outside the timing
    fused = FocalLoss(alpha=0.25, gamma=2.0)
    losses = {
        "fvcore sigmoid_focal_loss_jit": lambda x: sigmoid_focal_loss_jit(x[0], targets, 0.25, 2.0, "sum"),
        "torchvision sigmoid_focal_loss": lambda x: torchvision_focal_loss(x[0], targets, 0.25, 2.0, "sum"),
        "ours sigmoid_focal_loss": lambda x: sigmoid_focal_loss(x[0], targets, 0.25, 2.0, "sum"),
        "ours FocalLoss (fused)": lambda x: fused(x, labels, 1.0),
    }

    def value_and_grad(fn):
        x = logits.clone().requires_grad_()
        value = fn(x)
        value.backward()
        return value.detach(), x.grad

    ref_value, ref_grad = value_and_grad(losses["fvcore sigmoid_focal_loss_jit"])
    notes = {}
    for name, fn in losses.items():
        value, grad = value_and_grad(fn)
        value_diff = abs(value.item() - ref_value.item()) / abs(ref_value.item())
        grad_diff = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        notes[name] = f"value rel. diff {value_diff:.1e}, max grad diff / max grad {grad_diff:.1e}"
    times = race({name: (lambda fn=fn: value_and_grad(fn)) for name, fn in losses.items()}, args.rounds, device)
    case = f"{num_anchors:,} anchors x {num_classes}, fwd+bwd"
    report.add_times("loss", case, times, reference="fvcore sigmoid_focal_loss_jit", notes=notes)


def print_profiles(fns: Dict[str, Callable[[], object]], title: str, rows: int = 8) -> None:
    """torch.profiler's operators by self CPU time for one call of each function (after one
    unprofiled call)."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n[profile] {title}: {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_train(args, report: Report, device: torch.device) -> None:
    cfg, models = build_pair(args, amp=True)
    inputs = synthetic_batch(args.train_batch, args.train_size, cfg.MODEL.RETINANET.NUM_CLASSES)
    precisions = {OURS_AMP: amp_precision(args)}
    steps = {name: train_step_fn(m, inputs, precisions.get(name)) for name, m in models.items()}
    with_ema = copy.deepcopy(models[OURS])
    steps[OURS_EMA] = train_step_fn(with_ema, inputs, ema=ModelEMA(with_ema, decay=cfg.MODEL_EMA.DECAY))
    if args.profile:
        print_profiles(steps, f"train step, batch {args.train_batch} @ {args.train_size}px")
    times = race(steps, args.rounds, device)
    report.add_times("train", f"step, batch {args.train_batch} @ {args.train_size}px", times, reference=THEIRS)


def _matched_share(a: torch.Tensor, b: torch.Tensor) -> str:
    """How many rows of ``a`` have a same-class row of ``b`` with box IoU ≥ 0.9."""
    iou = pairwise_iou(Boxes(a[:, 2:]), Boxes(b[:, 2:]))  # (Da, Db)
    matched = ((iou >= 0.9) & (a[:, 1:2] == b[None, :, 1])).any(dim=1)
    return f"{int(matched.sum())} of {len(a)} detections matched (same class, IoU >= 0.9)"


def _same_detections(a, b) -> str:
    a, b = paired_detection_rows(a[0]["instances"], b[0]["instances"])
    if a.shape != b.shape or not torch.equal(a[:, 1], b[:, 1]):
        return f"different detections: {_matched_share(a, b)}"
    diff = (a - b).abs().amax(dim=0) if len(a) else torch.zeros(6)
    text = f"{len(a)} detections, same classes, max score diff {diff[0]:.1e}, max box diff {diff[2:].max():.1e} px"
    if diff[2:].max() > 1.0:  # TF32 or bfloat16 rounding can swap a detection at the top-k or threshold cut
        text += f" ({_matched_share(a, b)})"
    return text


@torch.no_grad()
def bench_inference(args, report: Report, device: torch.device) -> None:
    _, models = build_pair(args, amp=True)
    theirs = models[THEIRS].eval()
    inputs = [{"image": x["image"]} for x in synthetic_batch(1, args.train_size, 1, seed=1)]
    make_detections_nontrivial(theirs, inputs)
    reference = theirs(inputs)
    notes = {}
    for name in (n for n in models if n != THEIRS):
        models[name].load_state_dict(theirs.state_dict())
        notes[name] = _same_detections(models[name].eval()(inputs), reference)
        print(f"[inference] {name} vs {THEIRS}: {notes[name]}", flush=True)
    size = f"batch 1 @ {args.train_size}px"
    end_to_end = {name: (lambda m=m: m(inputs)) for name, m in models.items()}
    if args.profile:
        print_profiles(end_to_end, f"inference, {size}")
    report.add_times("inference", f"end to end, {size}", race(end_to_end, args.rounds, device), reference=THEIRS, notes=notes)

    stages = {}
    for name, m in ((OURS, models[OURS]), (THEIRS, theirs)):
        images = m.preprocess_image(inputs)
        features = m.backbone(images.tensor)
        features = [features[f] for f in m.head_in_features]
        head_out = m.head(features)
        stages[name] = (m, images, features, head_out)
    report.add_times("inference", f"backbone + FPN, {size}", race(
        {name: (lambda m=m, im=im: m.backbone(im.tensor)) for name, (m, im, _, _) in stages.items()}, args.rounds, device),
        reference=THEIRS)
    report.add_times("inference", f"head, {size}", race(
        {name: (lambda m=m, f=f: m.head(f)) for name, (m, _, f, _) in stages.items()}, args.rounds, device),
        reference=THEIRS)

    def post(m, images, features, head_out):  # both are DenseDetectors: what their forward does after the head
        results = m.forward_inference(images, features, head_out)
        return [detector_postprocess(r, *image_size) for r, image_size in zip(results, images.image_sizes)]

    report.add_times("inference", f"post-processing, {size}", race(
        {name: (lambda s=s: post(*s)) for name, s in stages.items()}, args.rounds, device), reference=THEIRS)


def register_noise_images(folder: str, count: int, size: int) -> str:
    """Register ``count`` uniform-noise PNGs of ``size`` px (the distribution of the section's
    inputs) as a dataset without boxes, named by size (the int8 cache key holds the name): the
    int8 calibration set; returns its name."""
    name = f"retina_focal_benchmark_noise_{size}px"
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, image in enumerate(random_images([(size, size)] * count, seed=2)):
        path = os.path.join(folder, f"noise_{size}px_{i}.png")
        cv2.imwrite(path, image.permute(1, 2, 0).numpy().astype("uint8"))
        records.append({"file_name": path, "height": size, "width": size, "image_id": i, "annotations": []})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    return name


def backend_models(args, cfg, model) -> Dict[str, Callable]:
    """{row name: inference model} of every backend and precision the section races, all with
    ``model``'s weights (their programs are built at the first call of each size)."""
    side = max(args.backend_sizes)
    calibration = register_noise_images(os.path.join(args.output_dir, "calibration"), args.calibration_images, side)
    base = ["TEST.BACKEND.CACHE_DIR", os.path.join(args.output_dir, "backend_cache"),
            "DATASETS.TRAIN", (calibration,), "TEST.BACKEND.CALIBRATION_IMAGES", args.calibration_images,
            "INPUT.MIN_SIZE_TEST", side, "INPUT.MAX_SIZE_TEST", side]  # the calibration images' size (the inputs come resized)
    variants = {"eager": [], "compiled": ["TEST.BACKEND.NAME", "compiled"], "onnxruntime": ["TEST.BACKEND.NAME", "onnxruntime"],
                "onnxruntime int8": ["TEST.BACKEND.NAME", "onnxruntime", "TEST.BACKEND.INT8", True]}
    if importlib.util.find_spec("torchao") is not None:
        variants["compiled int8"] = ["TEST.BACKEND.NAME", "compiled", "TEST.BACKEND.INT8", True]
    precision = amp_precision(args)
    if precision is not None:
        amp = ["TEST.AMP.ENABLED", True, "TEST.AMP.PRECISION", str(precision).split(".")[-1]]
        variants.update({"eager " + amp[-1]: amp, "compiled " + amp[-1]: ["TEST.BACKEND.NAME", "compiled", *amp]})
    models = {}
    for name, opts in variants.items():
        variant_cfg = cfg.clone()
        variant_cfg.merge_from_list(base + opts)
        variant = build_model(variant_cfg).eval()
        variant.load_state_dict(model.state_dict())
        models[f"{OURS} {name}"] = build_inference_model(variant_cfg, variant)
    return models


@torch.no_grad()
def bench_backends(args, report: Report, device: torch.device) -> None:
    cfg, pair = build_pair(args)
    theirs = pair[THEIRS].eval()
    make_detections_nontrivial(theirs, [{"image": x["image"]} for x in synthetic_batch(1, 512, 1, seed=1)])
    models = {THEIRS: theirs, **backend_models(args, cfg, theirs)}
    for size in args.backend_sizes:
        inputs = [{"image": x["image"]} for x in synthetic_batch(1, size, 1, seed=1)]
        reference = theirs(inputs)
        notes = {}
        for name, model in models.items():
            start = time.perf_counter()
            detections = model(inputs)  # builds (or loads) the programs of this size
            first_call = time.perf_counter() - start
            if name != THEIRS:
                notes[name] = f"{_same_detections(detections, reference)}; first call {first_call:.1f} s"
                print(f"[backends] {size}px {name}: {notes[name]}", flush=True)
        times = race({name: (lambda m=m: m(inputs)) for name, m in models.items()}, args.rounds, device)
        report.add_times("backends", f"end to end, batch 1 @ {size}px", times, reference=THEIRS, notes=notes)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def memory_worker(args) -> None:
    """In a fresh process: per (size, batch), a warm-up step, then the peak resident memory of
    one step above the resident memory before it. Prints one JSON dict."""
    cfg, models = build_pair(args)
    model = models[args.memory_worker]
    del models
    peaks = {}
    for shape in args.shapes.split(","):
        size, batch = (int(v) for v in shape.split(":"))
        step = train_step_fn(model, synthetic_batch(batch, size, cfg.MODEL.RETINANET.NUM_CLASSES))
        step()
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        step()
        peaks[shape] = _status_bytes("VmHWM") - before
    print("PEAKS " + json.dumps(peaks))


def measure_peaks(args, shapes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{shape: {implementation: peak bytes}} from one worker process per implementation."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    peaks: Dict[str, Dict[str, float]] = {s: {} for s in shapes}
    for name in (OURS, THEIRS):
        cmd = [sys.executable, os.path.abspath(__file__), "--config-file", args.config_file, "--device", args.device,
               "--threads", str(args.threads),
               "--memory-worker", name, "--shapes", ",".join(shapes), *args.opts]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        for shape, peak in json.loads(out.split("PEAKS ", 1)[1]).items():
            peaks[shape][name] = peak
    return peaks


def bench_memory(args, report: Report, device: torch.device) -> None:
    if device.type == "cuda":
        raise SystemExit("the memory sections measure CPU memory; run them with MODEL.DEVICE cpu")
    shape = f"{args.train_size}:{args.train_batch}"
    peaks = measure_peaks(args, [shape])
    report.add_memory("memory", f"train step, batch {args.train_batch} @ {args.train_size}px", peaks[shape], reference=THEIRS)


def bench_scaling(args, report: Report, device: torch.device) -> None:
    cfg, models = build_pair(args)
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    shapes = [f"{s}:{b}" for s in args.sizes for b in args.batches]
    peaks = measure_peaks(args, shapes) if device.type == "cpu" else {}
    for shape in shapes:
        size, batch = (int(v) for v in shape.split(":"))
        inputs = synthetic_batch(batch, size, num_classes)
        times = race({name: train_step_fn(m, inputs) for name, m in models.items()}, args.scaling_rounds, device)
        case = f"step, batch {batch} @ {size}px"
        report.add_times("scaling", case, times, reference=THEIRS)
        if shape in peaks:
            report.add_memory("scaling", case, peaks[shape], reference=THEIRS)


def main(argv=None) -> str:
    threads = torch.get_num_threads()
    try:
        return run(parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)


def run(args, argv) -> str:
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return ""
    cfg = load_config(args.config_file, ["MODEL.DEVICE", args.device, *args.opts])
    device = torch.device(cfg.MODEL.DEVICE)
    header = (f"Benchmark: `python tools/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
              f"{args.config_file}, {cfg.MODEL.DEVICE}, {cpu_description()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds "
              f"(scaling: {args.scaling_rounds}); ratio = this implementation / the reference row.")
    print(header, flush=True)
    report = Report()
    if "loss" in args.sections:
        bench_loss(args, report, device)
    if "train" in args.sections:
        bench_train(args, report, device)
    if "memory" in args.sections:
        bench_memory(args, report, device)
    if "scaling" in args.sections:
        bench_scaling(args, report, device)
    if "inference" in args.sections:
        bench_inference(args, report, device)
    if "backends" in args.sections:
        bench_backends(args, report, device)
    return report.write(args.output_dir, header)


if __name__ == "__main__":
    print(main())
