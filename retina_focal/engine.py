"""Training glue: a DefaultTrainer that evaluates with COCOEvaluator and runs DDP on CPUs.

``train_net.py`` is a thin command line around :class:`RetinaFocalTrainer` and :func:`setup`.
"""
import logging
import os
from contextlib import contextmanager

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .config import add_retina_focal_config
from .data import register_builtin_shapes

__all__ = ["RetinaFocalTrainer", "create_ddp_model", "setup", "evaluate"]

logger = logging.getLogger(__name__)

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` that also works for CPU models (gloo).

    detectron2 passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for a module on the CPU; there ``device_ids`` must be None.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextmanager
def _cpu_aware_ddp():
    """Let DefaultTrainer.__init__ (which calls the module-level function) use ours."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


class RetinaFocalTrainer(DefaultTrainer):
    """DefaultTrainer + COCOEvaluator + CPU-safe DDP. Everything else is detectron2's."""

    def __init__(self, cfg):
        with _cpu_aware_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        DatasetCatalog.get(dataset_name)  # datasets generated on first use must exist now
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    """Build the frozen cfg from ``--config-file`` and trailing ``KEY VALUE`` overrides."""
    register_builtin_shapes()
    cfg = get_cfg()
    add_retina_focal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    _share_cpu_threads(cfg)
    return cfg


def _share_cpu_threads(cfg) -> None:
    """N CPU processes on one machine each get cores/N threads instead of all cores each
    (oversubscription makes a 2-process CPU run slower than one process)."""
    local = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and local > 1:
        threads = max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)
        logger.info(f"{local} CPU processes on this machine: {threads} torch thread(s) each")


def evaluate(cfg):
    """``--eval-only``: load ``MODEL.WEIGHTS`` and run the test sets through COCOEvaluator."""
    model = RetinaFocalTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return RetinaFocalTrainer.test(cfg, model)
