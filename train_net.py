#!/usr/bin/env python
"""Train or evaluate RetinaFocal with detectron2's trainer and launcher.

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --config-file ... --resume            # continue from last_checkpoint
    python train_net.py --num-gpus 2 --config-file ... MODEL.DEVICE cpu   # 2 gloo processes
    python train_net.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.py  # a LazyConfig
"""
from detectron2.engine import launch

from retina_focal.engine.defaults import argument_parser, evaluate, setup
from retina_focal.engine.lazy import is_lazy_config, lazy_main
from retina_focal.engine.trainer import RetinaFocalTrainer


def main(args, trainer_cls=RetinaFocalTrainer):
    if is_lazy_config(args.config_file):  # a .py config: retina_focal/engine/lazy.py
        return lazy_main(args)
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args, trainer_cls=RetinaFocalTrainer):
    """Start ``main`` in ``--num-gpus`` processes per machine (one without DDP)."""
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args, trainer_cls),
    )


if __name__ == "__main__":
    run(argument_parser().parse_args())
