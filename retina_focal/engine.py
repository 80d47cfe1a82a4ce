"""Training glue: a DefaultTrainer that evaluates with COCOEvaluator, runs DDP on CPUs,
checks its data, resumes exactly and explains a non-finite loss.

``train_net.py`` is a thin command line around :class:`RetinaFocalTrainer` and :func:`setup`.
"""
import contextlib
import json
import logging
import math
import os
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, TrainerBase, default_argument_parser, default_setup, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.logger import setup_logger

from .backends import add_backend_argument, backend_opts, build_inference_model
from .checkpoint import AttributeState, RetinaFocalCheckpointer, RunFacts, load_inference_weights
from .config import add_retina_focal_config
from .data.mapper import build_train_mapper
from .diagnostics.anchor_coverage import fit_anchors
from .ema import EMAHook, ModelEMA
from .evaluation import evaluator_class
from .hooks import insert_diagnostic_hooks
from .losses import class_balanced_alpha
from .tta import RetinaFocalWithTTA
from .precision import build_step_trainer
from .data import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    check_num_classes,
    check_same_classes,
    checked_dataset_dicts,
    coco_json_for_evaluation,
    dataset_folder_name,
    drop_unusable_images,
    image_check_args,
    register_builtin_shapes,
    register_config_datasets,
    resolve_num_classes,
)

__all__ = [
    "NonFiniteLossError",
    "RetinaFocalTrainer",
    "argument_parser",
    "build_checkpointer",
    "run_facts",
    "create_ddp_model",
    "evaluate",
    "load_config",
    "setup",
]

logger = logging.getLogger(__name__)

def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` that also works for CPU models (gloo).

    detectron2 passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for a module on the CPU; there ``device_ids`` must be None.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_defaults.create_ddp_model(model, **kwargs)


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss, with the context needed to debug and resume (see the message)."""


def build_checkpointer(cfg, model, **kwargs) -> RetinaFocalCheckpointer:
    """The checkpointer of a RetinaFocal run (atomic saves, classifier-size check)."""
    return RetinaFocalCheckpointer(
        model,
        cfg.OUTPUT_DIR,
        reinit_mismatched_classifier=cfg.MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER,
        **kwargs,
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class RetinaFocalTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer plus:

    * COCOEvaluator (or the faster-coco-eval one, ``TEST.EVALUATOR``), and DDP that also
      works for CPU processes (gloo);
    * ``MODEL_EMA.ENABLED``: an EMA of the weights, evaluated and saved as the model;
    * ``SOLVER.AMP.ENABLED`` on any device, in ``SOLVER.AMP.PRECISION`` (float16 with a
      GradScaler, or bfloat16; retina_focal/precision.py);
    * training data checked once before the first step (``retina_focal.data.checks``) and
      a data stream that ``--resume`` continues exactly (``retina_focal.data.train_stream``);
    * atomic checkpoints that also hold the EMA loss normalizer and the stream seed;
    * ``SOLVER.LOG_PERIOD``; a non-finite loss raises :class:`NonFiniteLossError` naming
      the iteration, the loss term and the checkpoint to resume from, and writes a report.
    """

    def __init__(self, cfg):
        """DefaultTrainer's construction, in its order, with our DDP (CPU-aware), step
        trainer (AMP on any device) and checkpointer."""
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger was not called
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        amp = cfg.SOLVER.AMP
        self._trainer = build_step_trainer(
            create_ddp_model(model, broadcast_buffers=False), data_loader, optimizer,
            amp=amp.ENABLED, precision=amp.PRECISION, device=cfg.MODEL.DEVICE, key="SOLVER.AMP.PRECISION",
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.ema = ModelEMA(model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        self.checkpointer = build_checkpointer(cfg, self._trainer.model, trainer=weakref.proxy(self), ema=self.ema)
        self.checkpointer.add_checkpointable("loss_normalizer", AttributeState(model, ["loss_normalizer"]))
        self.checkpointer.add_checkpointable("run_facts", RunFacts(run_facts(cfg, data_loader), cfg.RESUME.ALLOW_CHANGES))
        if isinstance(data_loader, ResumableTrainLoader):
            self.checkpointer.add_checkpointable("train_stream", data_loader)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        _set_writer_period(ret, self.cfg.SOLVER.LOG_PERIOD)
        if self.ema is not None:
            ret = [EMAHook(self.ema)] + [self._ema_eval_hook() if isinstance(h, hooks.EvalHook) else h for h in ret]
        if self.cfg.TEST.AUG.ENABLED:  # after the last iteration, also with test-time augmentation
            ret.append(hooks.EvalHook(0, lambda: self._evaluated(self.test_with_TTA)))
        # TEST.VAL_LOSS_PERIOD, SOLVER.BEST_CHECKPOINT_METRIC (retina_focal/hooks.py)
        return insert_diagnostic_hooks(self.cfg, ret, self.checkpointer)

    def _ema_eval_hook(self) -> hooks.EvalHook:
        """detectron2's evaluation hook (same period, same results), on the EMA weights."""

        def test_and_save_results():
            self._last_eval_results = self._evaluated(self.test)
            return self._last_eval_results

        return hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_and_save_results)

    def _evaluated(self, test) -> Dict:
        """``test(cfg, model)`` on the weights that are evaluated: the EMA ones if any."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return test(self.cfg, self.model)

    @classmethod
    def test_with_TTA(cls, cfg, model) -> Dict:
        """COCO evaluation of ``model`` with test-time augmentation (``TEST.AUG``), results
        under "<task>_TTA" and files in OUTPUT_DIR/inference_TTA, as detectron2's example."""
        model = model.module if isinstance(model, DistributedDataParallel) else model
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", dataset_folder_name(name)))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, RetinaFocalWithTTA.from_config(cfg, model), evaluators)
        return OrderedDict((task + "_TTA", value) for task, value in results.items())

    def build_writers(self):
        window = self.cfg.SOLVER.LOG_PERIOD
        return [
            CommonMetricPrinter(self.max_iter, window_size=window),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), window_size=window),
            TensorboardXWriter(self.cfg.OUTPUT_DIR, window_size=window),
        ]

    def resume_or_load(self, resume: bool = True):
        """detectron2's, plus ``RESUME.CHECKPOINT`` (resume from that file instead of the one
        ``last_checkpoint`` names), and the data stream started where the run stopped."""
        chosen = self.cfg.RESUME.CHECKPOINT
        if resume and chosen:
            path = chosen if os.path.isabs(chosen) else os.path.join(self.cfg.OUTPUT_DIR, chosen)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RESUME.CHECKPOINT {chosen!r}: no such file {path}")
            self.checkpointer.load(path)  # the model and every checkpointable
            self.start_iter = self.iter + 1
        else:
            super().resume_or_load(resume=resume)
        if self.ema is not None and self.ema.num_updates == 0:  # a new run, or a checkpoint without EMA
            self.ema.reset()  # average from the loaded weights
        if isinstance(self._trainer.data_loader, ResumableTrainLoader):
            self._trainer.data_loader.start_at(self.start_iter)

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            raise NonFiniteLossError(self._report_non_finite_loss()) from e

    def _report_non_finite_loss(self) -> str:
        """Write ``non_finite_loss_iter_*.json`` beside the checkpoints; return the message."""
        report = non_finite_loss_report(self._trainer.model, self._trainer.data_loader, self._trainer.optimizer)
        report["iteration"] = self.iter
        report["last_checkpoint"] = (
            self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
        )
        path = os.path.join(self.cfg.OUTPUT_DIR, f"non_finite_loss_iter_{self.iter:07d}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        return _non_finite_loss_message(report, path)

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = checked_dataset_dicts(
            cfg.DATASETS.TRAIN,
            cfg.MODEL.RETINANET.NUM_CLASSES,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            **image_check_args(cfg, is_train=True),
        )
        mapper = build_train_mapper(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: detectron2's sampler is used, "
                "and --resume does not continue its data stream exactly"
            )
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        return build_resumable_train_loader(
            dicts,
            mapper,
            seed=cfg.SEED,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader over the images of ``dataset_name`` that can be used
        (``DATALOADER.CHECK_IMAGES``); the evaluator then scores the images it saw."""
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        dicts = drop_unusable_images(dicts, [dataset_name], **image_check_args(cfg, is_train=False))
        return build_detection_test_loader(
            dataset=dicts, mapper=DatasetMapper(cfg, is_train=False), num_workers=cfg.DATALOADER.NUM_WORKERS
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_folder_name(dataset_name))
        DatasetCatalog.get(dataset_name)  # datasets generated on first use must exist now
        check_num_classes(cfg.MODEL.RETINANET.NUM_CLASSES, [dataset_name])
        check_same_classes(cfg.DATASETS.TRAIN, dataset_name)
        coco_json_for_evaluation(dataset_name, output_folder)  # VOC and CSV sets
        return evaluator_class(cfg.TEST.EVALUATOR)(
            dataset_name, output_dir=output_folder, score_thresh=cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        )


def _set_writer_period(trainer_hooks: List, period: int) -> None:
    """``SOLVER.LOG_PERIOD`` for the writers hook. detectron2's ``DefaultTrainer.build_hooks``
    fixes it ("ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))") and
    ``PeriodicWriter`` has no public setter; building a second one would open the writers'
    files twice. So the private attribute is set, here only."""
    for hook in trainer_hooks:
        if isinstance(hook, hooks.PeriodicWriter):
            hook._period = period


def run_facts(cfg, data_loader) -> Dict:
    """What the data stream and the LR schedule depend on, and whether the weights are
    averaged, as :class:`RunFacts` records it in every checkpoint (values after detectron2's
    rescaling for the number of processes)."""
    return {
        "SOLVER.IMS_PER_BATCH": cfg.SOLVER.IMS_PER_BATCH,
        "number of processes": comm.get_world_size(),
        "SOLVER.MAX_ITER": cfg.SOLVER.MAX_ITER,
        "SOLVER.STEPS": cfg.SOLVER.STEPS,
        "DATASETS.TRAIN": cfg.DATASETS.TRAIN,
        "training images": len(data_loader.dataset) if isinstance(data_loader, ResumableTrainLoader) else None,
        "MODEL_EMA.ENABLED": cfg.MODEL_EMA.ENABLED,  # whether the checkpoint's "model" is the EMA
    }


def non_finite_loss_report(model, data_loader, optimizer) -> Dict:
    """What went into the failed step: image ids, loss per FPN level, gradient norm, LR.

    The loss per level is recomputed on the step's batch (when the loader recorded it) in
    eval mode, so no collective op runs while other ranks may be gone.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    report = {
        "learning_rate": [group["lr"] for group in optimizer.param_groups],
        "grad_norm": float(torch.nn.utils.get_total_norm(grads)) if grads else None,
        "images": None,
        "loss_per_level": None,
    }
    batch = getattr(data_loader, "last_batch", None)
    if batch is not None:
        report["images"] = [{"image_id": x.get("image_id"), "file_name": x.get("file_name")} for x in batch]
        report["loss_per_level"] = _loss_per_level_in_eval_mode(_unwrap(model), batch)
    return report


def _loss_per_level_in_eval_mode(model, batch: List[Dict]) -> Optional[Dict[str, Dict[str, float]]]:
    if not hasattr(model, "loss_per_level"):
        return None
    was_training = model.training
    model.eval()
    try:
        return model.loss_per_level(batch)
    finally:
        model.train(was_training)


def _non_finite_loss_message(report: Dict, path: str) -> str:
    bad_levels = {
        term: [level for level, v in levels.items() if not math.isfinite(v)]
        for term, levels in (report["loss_per_level"] or {}).items()
    }
    terms = ", ".join(f"{t} (levels {', '.join(ls)})" for t, ls in bad_levels.items() if ls) or "see the loss_dict above"
    checkpoint = report["last_checkpoint"]
    resume = (
        f"the last checkpoint is {checkpoint}: fix the cause (e.g. a lower SOLVER.BASE_LR, a longer "
        "SOLVER.WARMUP_ITERS, or the images listed in the report) and rerun with --resume"
        if checkpoint
        else "no checkpoint was written yet: the run has to start again"
    )
    return (
        f"Non-finite loss at iteration {report['iteration']}: {terms}; gradient norm "
        f"{report['grad_norm']}, learning rate {report['learning_rate']}. Report: {path}; {resume}."
    )


def load_config(config_file: str, opts: Sequence = ()) -> CfgNode:
    """detectron2's defaults + ``MODEL.RETINA_FOCAL`` + ``config_file`` + ``KEY VALUE``
    overrides, not frozen. Registers the built-in shapes datasets and the dataset specs
    (``coco:``, ``voc:``, ``csv:``, retina_focal/data/formats.py) the config names, and
    resolves ``MODEL.RETINANET.NUM_CLASSES 0`` to the training set's number of classes."""
    cfg, notes = _config_and_notes(config_file, opts)
    for note in notes:
        logger.info(note)
    return cfg


def _config_and_notes(config_file: str, opts: Sequence = ()) -> Tuple[CfgNode, List[str]]:
    """:func:`load_config`'s config, and what it registered and resolved (for the log)."""
    register_builtin_shapes()
    cfg = get_cfg()
    add_retina_focal_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    notes = register_config_datasets(cfg)
    notes.append(resolve_num_classes(cfg))
    notes.append(_resolve_class_balanced_alpha(cfg))
    return cfg, [n for n in notes if n]


def _resolve_class_balanced_alpha(cfg) -> Optional[str]:
    """``LOSS.CLASS_BALANCED_BETA`` > 0 with an empty ``CLASS_ALPHA``: set ``CLASS_ALPHA`` from
    the training boxes per class (``losses.class_balanced_alpha``); returns the log line."""
    beta, loss_cfg = cfg.MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA, cfg.MODEL.RETINA_FOCAL.LOSS
    if beta == 0 or loss_cfg.CLASS_ALPHA:
        return None
    counts = [0] * cfg.MODEL.RETINANET.NUM_CLASSES
    for record in get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False):
        for ann in record.get("annotations", []):
            if not ann.get("iscrowd", 0) and 0 <= ann["category_id"] < len(counts):
                counts[ann["category_id"]] += 1
    loss_cfg.CLASS_ALPHA = class_balanced_alpha(counts, cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA, beta)
    return f"LOSS.CLASS_BALANCED_BETA {beta}: boxes per class {counts} -> CLASS_ALPHA {list(loss_cfg.CLASS_ALPHA)}"


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
    (and, with ``--fit-anchors``, anchors fitted to the training boxes)."""
    cfg, notes = _config_and_notes(args.config_file, backend_opts(args) + list(args.opts))
    if getattr(args, "fit_anchors", False):
        notes.append(fit_anchors(cfg))
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retina_focal")  # into log.txt
    for note in notes:  # logged now that the logger writes to the console and log.txt
        logger.info(note)
    _share_cpu_threads(cfg)
    _configure_determinism(cfg)
    return cfg


def _configure_determinism(cfg) -> None:
    """``DETERMINISTIC True``: deterministic kernels and no cuDNN autotuning (see config.py)."""
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
    (retina_focal/backends.py), with ``TEST.AUG.ENABLED`` also with TTA."""
    model = RetinaFocalTrainer.build_model(cfg)
    load_inference_weights(model, cfg.MODEL.WEIGHTS)
    model = build_inference_model(cfg, model.eval())
    results = RetinaFocalTrainer.test(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        results.update(RetinaFocalTrainer.test_with_TTA(cfg, model))
    return results
