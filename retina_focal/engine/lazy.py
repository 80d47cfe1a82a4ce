"""Training and evaluation from detectron2's Python configs (``LazyConfig``, ``instantiate``).

    python train_net.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.py
    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retina_focal_R_50_FPN_1x.py
    python train_net.py --config-file C.py --eval-only train.init_checkpoint=output/run/model_final.pth

A ``.py`` config has detectron2's lazy layout: ``model``, ``dataloader.train`` /
``dataloader.test`` / ``dataloader.evaluator``, ``optimizer``, ``lr_multiplier`` and ``train``
(``output_dir``, ``init_checkpoint``, ``max_iter``, ``amp``, ``ddp``, ``checkpointer``,
``eval_period``, ``log_period``, ``device``, ``seed``); overrides are ``key=value``. The loop is
detectron2's ``tools/lazyconfig_train_net.py`` with this package's checkpointer (atomic saves,
clear errors on truncated files), its mixed-precision trainer (``train.amp.enabled``, any
device, ``train.amp.precision`` as ``SOLVER.AMP.PRECISION``) and weights that must fit for
``--eval-only``. What the ``.yaml`` trainer adds beyond that (the resumable data stream and
``RunFacts``, EMA, TTA, validation loss, best checkpoint, non-finite-loss reports) needs a
``.yaml`` config.
"""
import logging
from typing import Dict, List

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import create_ddp_model, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.data import (
    coco_json_for_evaluation,
    register_builtin_shapes,
    register_dataset,
)
from retina_focal.engine.amp import build_step_trainer
from retina_focal.engine.launch import end_with_launcher
from retina_focal.engine.run_lock import hold_output_dir
from retina_focal.export.predictor import inference_model
from retina_focal.model_zoo.model_zoo import find_config_file

__all__ = ["do_test", "do_train", "is_lazy_config", "lazy_main", "lazy_setup"]

logger = logging.getLogger(__name__)


def is_lazy_config(path: str) -> bool:
    """Whether ``--config-file`` names a Python (LazyConfig) config."""
    return path.endswith(".py")


def _names(dataset) -> List[str]:
    """The dataset names of a lazy ``dataset=L(...)(names=...)`` node (a str or a list)."""
    names = dataset.get("names", []) if hasattr(dataset, "get") else []
    return [names] if isinstance(names, str) else list(names)


def lazy_setup(args):
    """Load the ``.py`` config with ``key=value`` overrides, register its datasets (the
    built-in shapes and coco:/voc:/csv: specs) and set up logging as detectron2 does."""
    if getattr(args, "fit_anchors", False):
        raise ValueError("--fit-anchors needs a .yaml config (it writes MODEL.ANCHOR_GENERATOR keys)")
    if getattr(args, "backend", None):
        raise ValueError("--backend needs a .yaml config (it sets TEST.BACKEND keys)")
    end_with_launcher()
    args.config_file = find_config_file(args.config_file)  # a path, or a packaged config's name
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    register_builtin_shapes()
    for name in _names(cfg.dataloader.train.dataset) + _names(cfg.dataloader.test.dataset):
        register_dataset(name)
    if comm.is_main_process() and not getattr(args, "eval_only", False):  # before default_setup writes there
        hold_output_dir(cfg.train.output_dir)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="retina_focal")
    return cfg


def do_test(cfg, model) -> Dict:
    """COCO evaluation of ``model`` on ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    for name in _names(cfg.dataloader.test.dataset):  # VOC and CSV sets need a COCO JSON
        coco_json_for_evaluation(name, cfg.dataloader.evaluator.get("output_dir") or cfg.train.output_dir)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, resume: bool = False) -> None:
    """Train ``cfg.model`` as detectron2's lazy training loop (module docstring)."""
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    amp = cfg.train.get("amp", {})
    trainer = build_step_trainer(
        model, data_loader, optimizer, amp=amp.get("enabled", False), precision=amp.get("precision", "auto"),
        device=cfg.train.device, key="train.amp.precision",
    )
    checkpointer = RetinaFocalCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def lazy_main(args):
    """``train_net.py`` for a ``.py`` config: train, or with ``--eval-only`` evaluate
    ``train.init_checkpoint`` (every tensor of the model must be in it)."""
    cfg = lazy_setup(args)
    if args.eval_only:
        if not cfg.train.init_checkpoint:
            raise FileNotFoundError(
                "--eval-only with a .py config evaluates train.init_checkpoint, which is empty; "
                "pass train.init_checkpoint=path/to/model_final.pth"
            )
        model = inference_model(instantiate(cfg.model).to(cfg.train.device), cfg.train.init_checkpoint)
        return do_test(cfg, create_ddp_model(model))
    return do_train(cfg, resume=args.resume)
