#!/usr/bin/env python
"""The README's main job: train RetinaFocal on the built-in shapes dataset on a CPU, then
evaluate with COCOEvaluator and draw what it learned.

    python tools/demo.py                                  # what `make demo` runs (ImageNet MobileNetV2)
    python tools/demo.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml   # `make demo-scratch`
    python tools/demo.py --num-gpus 2                     # 2 gloo processes on the CPU
    python tools/demo.py --config-file C.yaml KEY VALUE   # any config / overrides

Writes into OUTPUT_DIR: detectron2's log, metrics.json, TensorBoard events, checkpoints and
COCO results, plus training_curves.png and predictions/<image id>.png (prediction | truth).
"""
import contextlib
import os
import time

from detectron2.engine import launch
from detectron2.utils import comm

from retina_focal.engine.defaults import argument_parser, setup
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.utils.comm import unwrap_model
from retina_focal.utils.visualize import draw_predictions, plot_training_curves

DEFAULT_CONFIG = "configs/Shapes-Detection/retina_focal_MobileNetV2_FPN_demo.yaml"


def model_description(cfg) -> str:
    """The backbone builder, and the ResNet's depth where it builds one."""
    name = cfg.MODEL.BACKBONE.NAME
    return f"{name}, ResNet-{cfg.MODEL.RESNETS.DEPTH}" if "resnet" in name else name


def report(cfg, trainer, results, seconds: float) -> str:
    """Write the curves and pictures; return the "what just happened" paragraph."""
    out = cfg.OUTPUT_DIR
    curves = plot_training_curves(os.path.join(out, "metrics.json"), os.path.join(out, "training_curves.png"))
    model = unwrap_model(trainer.model)
    model.eval()
    dataset = cfg.DATASETS.TEST[0]
    with trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext():  # what was evaluated
        pictures = draw_predictions(model, dataset, os.path.join(out, "predictions"), input_format=cfg.INPUT.FORMAT)
    bbox = results.get(dataset, results).get("bbox", {}) if results else {}
    ap = ", ".join(f"{k} {bbox[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in bbox)
    return (
        f"\nWhat just happened: {cfg.MODEL.META_ARCHITECTURE} ({model_description(cfg)}) was trained "
        f"{'from ' + cfg.MODEL.WEIGHTS if cfg.MODEL.WEIGHTS else 'from scratch'} for {cfg.SOLVER.MAX_ITER} iterations of {cfg.SOLVER.IMS_PER_BATCH} images on "
        f"{cfg.DATASETS.TRAIN[0]}. Its classifier started at the prior pi = {cfg.MODEL.RETINANET.PRIOR_PROB} "
        f"for every anchor, and the focal loss (gamma = {cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA}, alpha = "
        f"{cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA}) turned that into detections. COCOEvaluator on {dataset}: "
        f"{ap or 'no result'}. Wall time {seconds / 60:.1f} min.\n"
        f"  log, metrics.json, TensorBoard events, checkpoints: {out}\n"
        f"  COCO results: {os.path.join(out, 'inference', dataset)}\n"
        f"  training curves: {curves}\n"
        f"  predictions (left) beside ground truth (right): {os.path.dirname(pictures[0])}/*.png "
        f"({len(pictures)} images)\n"
    )


def main(args):
    start = time.perf_counter()
    cfg = setup(args)
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns results only when TEST.EXPECTED_RESULTS is set; the
    # EvalHook keeps the last evaluation here
    results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        print(report(cfg, trainer, results, time.perf_counter() - start), flush=True)
    return results


if __name__ == "__main__":
    parser = argument_parser()
    parser.set_defaults(config_file=DEFAULT_CONFIG)
    args = parser.parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
