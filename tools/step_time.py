#!/usr/bin/env python
"""Median time of a training step (forward + backward + SGD) for config variants, side by side.

    python tools/step_time.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml \
        --variant base --variant fpn64 MODEL.FPN.OUT_CHANNELS 64 --variant convs2 MODEL.RETINANET.NUM_CONVS 2

Each ``--variant NAME [KEY VALUE ...]`` is timed on the same few batches of the config's
training set (loaded once, no loader workers), after 2 warm-up steps.
"""
import argparse
import statistics
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import retina_focal
from retina_focal.data import register_builtin_shapes


def step_times(cfg, batches, steps: int):
    model = build_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR / 10, momentum=0.9)
    times = []
    with EventStorage():
        for i in range(steps + 2):
            start = time.perf_counter()
            loss = sum(model(batches[i % len(batches)]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
    return times[2:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY VALUE]")
    args = parser.parse_args()
    register_builtin_shapes()
    base = get_cfg()
    retina_focal.add_retina_focal_config(base)
    base.merge_from_file(args.config_file)
    base.DATALOADER.NUM_WORKERS = 0
    loader = iter(build_detection_train_loader(base))
    batches = [next(loader) for _ in range(3)]
    print(f"threads: {torch.get_num_threads()}, batch {base.SOLVER.IMS_PER_BATCH}, {args.steps} timed steps")
    print("| variant | median s/step | min | max |\n|---|---|---|---|")
    for name, *opts in args.variant:
        cfg = base.clone()
        cfg.merge_from_list(opts)
        t = step_times(cfg, batches, args.steps)
        print(f"| {name} {' '.join(opts)} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |", flush=True)


if __name__ == "__main__":
    main()
