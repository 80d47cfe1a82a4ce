#!/usr/bin/env python
"""Train or evaluate RetinaFocal with detectron2's trainer and launcher.

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --config-file ... --resume            # continue from last_checkpoint
    python train_net.py --num-gpus 2 --config-file ... MODEL.DEVICE cpu   # 2 gloo processes
"""
from detectron2.engine import default_argument_parser, launch

from retina_focal.engine import RetinaFocalTrainer, evaluate, setup


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg)
    trainer = RetinaFocalTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
