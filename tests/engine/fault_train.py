#!/usr/bin/env python
"""train_net.py with a fault injected by the tests (never used outside tests/).

    python tests/engine/fault_train.py --fault FAULT [train_net.py arguments]

FAULT is one of
    sigkill@N      the process kills itself with SIGKILL after iteration N (kill -9);
    raise@N:rR     rank R raises RuntimeError at iteration N;
    empty:rR       every training image of rank R loses its annotations.
"""
import os
import re
import signal
import sys

from detectron2.engine import HookBase, default_argument_parser
from detectron2.structures import Instances
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout
import train_net  # noqa: E402
from retina_focal.engine.trainer import RetinaFocalTrainer  # noqa: E402


def _parse(fault: str):
    match = re.fullmatch(r"(sigkill|raise|empty)(?:@(\d+))?(?::r(\d+))?", fault)
    if match is None:
        raise ValueError(f"--fault {fault!r}: expected sigkill@N, raise@N:rR or empty:rR")
    kind, iteration, rank = match.groups()
    return kind, int(iteration or -1), int(rank or 0)


class _FaultHook(HookBase):
    def __init__(self, kind: str, iteration: int, rank: int):
        self.kind, self.iteration, self.rank = kind, iteration, rank

    def after_step(self):
        if self.trainer.iter != self.iteration or comm.get_rank() != self.rank:
            return
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault on rank {self.rank} at iteration {self.iteration}")


def _without_annotations(loader):
    for batch in loader:
        for x in batch:
            x["instances"] = Instances(x["instances"].image_size, gt_boxes=x["instances"].gt_boxes[:0],
                                       gt_classes=x["instances"].gt_classes[:0])
        yield batch


def make_trainer(fault: str):
    kind, iteration, rank = _parse(fault)

    class FaultyTrainer(RetinaFocalTrainer):
        def build_hooks(self):
            ret = super().build_hooks()
            if kind in ("sigkill", "raise"):
                ret.insert(0, _FaultHook(kind, iteration, rank))
            return ret

        @classmethod
        def build_train_loader(cls, cfg):
            loader = super().build_train_loader(cfg)
            return _without_annotations(loader) if kind == "empty" and comm.get_rank() == rank else loader

    return FaultyTrainer


def main(args, fault):
    return train_net.main(args, make_trainer(fault))


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--fault", required=True)
    args = parser.parse_args()
    train_net.launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                     dist_url=args.dist_url, args=(args, args.fault))
