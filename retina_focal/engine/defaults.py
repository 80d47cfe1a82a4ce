"""What ``train_net.py`` runs: the argument parser, :func:`setup` (config, logging, threads,
determinism) and :func:`evaluate` (``--eval-only``)."""
import logging
import os

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retina_focal.config.load import config_and_notes
from retina_focal.diagnostics.anchor_coverage import fit_anchors
from retina_focal.engine.launch import end_with_launcher
from retina_focal.engine.run_lock import hold_output_dir
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.export.backends import add_backend_argument, backend_opts
from retina_focal.export.predictor import load_inference_model
from retina_focal.model_zoo import find_config_file

__all__ = ["argument_parser", "evaluate", "setup"]

logger = logging.getLogger(__name__)


def argument_parser():
    """detectron2's ``default_argument_parser`` plus ``--fit-anchors`` and ``--backend``."""
    parser = default_argument_parser()
    add_backend_argument(parser)
    parser.add_argument(
        "--fit-anchors",
        action="store_true",
        help="fit MODEL.ANCHOR_GENERATOR sizes and ratios to the boxes of DATASETS.TRAIN before training "
        "(tools/anchor_stats.py's search); the run's config.yaml records them and the log gives the coverage",
    )
    return parser


def setup(args):
    """Build the frozen cfg from ``--config-file`` and trailing ``KEY VALUE`` overrides
    (and, with ``--fit-anchors``, anchors fitted to the training boxes). ``--config-file`` may
    name a packaged config (``retina_focal.model_zoo``); ``args.config_file`` becomes its path,
    which detectron2's ``default_setup`` copies into the log. A worker of a multi-process run
    ends with its launcher (:func:`retina_focal.engine.launch.end_with_launcher`); the main
    process of a training run holds the OUTPUT_DIR (:func:`retina_focal.engine.run_lock.hold_output_dir`)."""
    end_with_launcher()
    args.config_file = find_config_file(args.config_file)
    cfg, notes = config_and_notes(args.config_file, backend_opts(args) + list(args.opts))
    if getattr(args, "fit_anchors", False):
        notes.append(fit_anchors(cfg))
    cfg.freeze()
    if comm.is_main_process() and not getattr(args, "eval_only", False):  # before default_setup writes config.yaml
        hold_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retina_focal")  # into log.txt
    for note in notes:  # logged now that the logger writes to the console and log.txt
        logger.info(note)
    _share_cpu_threads(cfg)
    _configure_determinism(cfg)
    return cfg


def _configure_determinism(cfg) -> None:
    """``DETERMINISTIC True``: deterministic kernels and no cuDNN autotuning (see retina_focal/config/defaults.py)."""
    if not cfg.DETERMINISTIC:
        return
    if cfg.SEED < 0:
        raise ValueError(f"DETERMINISTIC True needs a fixed SEED >= 0, got SEED={cfg.SEED}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _share_cpu_threads(cfg) -> None:
    """N CPU processes on one machine each get cores/N threads instead of all cores each
    (oversubscription makes a 2-process CPU run slower than one process)."""
    local = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and local > 1:
        threads = max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)
        logger.info(f"{local} CPU processes on this machine: {threads} torch thread(s) each")


def evaluate(cfg):
    """``--eval-only``: load ``MODEL.WEIGHTS`` (all of the model's tensors must be in it) and
    run the test sets through COCOEvaluator with the backend ``TEST.BACKEND.NAME``
    (retina_focal/export/backends.py), with ``TEST.AUG.ENABLED`` also with TTA."""
    model = load_inference_model(cfg)
    results = RetinaFocalTrainer.test(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        results.update(RetinaFocalTrainer.test_with_TTA(cfg, model))
    return results
