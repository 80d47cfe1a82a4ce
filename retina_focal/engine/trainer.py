"""The trainer: a DefaultTrainer that evaluates with COCOEvaluator, runs DDP on CPUs,
checks its data, resumes exactly and explains a non-finite loss.

``train_net.py`` is a thin command line around :class:`RetinaFocalTrainer` and
:func:`retina_focal.engine.defaults.setup`.
"""
import contextlib
import json
import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.logger import setup_logger

from retina_focal.checkpoint import RetinaFocalCheckpointer, RunFacts
from retina_focal.data import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    check_test_sets,
    checked_dataset_dicts,
    coco_json_for_evaluation,
    dataset_folder_name,
    drop_unusable_images,
    image_check_args,
)
from retina_focal.data.mapper import build_train_mapper
from retina_focal.engine.amp import build_step_trainer
from retina_focal.engine.compile import compile_dense_network
from retina_focal.engine.ema import EMAHook, ModelEMA
from retina_focal.engine.hooks import insert_diagnostic_hooks
from retina_focal.engine.non_finite import (
    NonFiniteLossError,
    non_finite_loss_message,
    non_finite_loss_report,
)
from retina_focal.evaluation import evaluator_class
from retina_focal.modeling.tta import RetinaFocalWithTTA
from retina_focal.utils.comm import unwrap_model

__all__ = ["RetinaFocalTrainer", "build_checkpointer", "create_ddp_model", "run_facts"]

logger = logging.getLogger(__name__)


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` that also works for CPU models (gloo).

    detectron2 passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
    for a module on the CPU; there ``device_ids`` must be None.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_defaults.create_ddp_model(model, **kwargs)


def build_checkpointer(cfg, model, **kwargs) -> RetinaFocalCheckpointer:
    """The checkpointer of a RetinaFocal run (atomic saves, classifier-size check)."""
    return RetinaFocalCheckpointer(
        model,
        cfg.OUTPUT_DIR,
        reinit_mismatched_classifier=cfg.MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER,
        **kwargs,
    )



class RetinaFocalTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer plus:

    * COCOEvaluator (or the faster-coco-eval one, ``TEST.EVALUATOR``), and DDP that also
      works for CPU processes (gloo);
    * ``MODEL_EMA.ENABLED``: an EMA of the weights, evaluated and saved as the model;
    * ``SOLVER.AMP.ENABLED`` on any device, in ``SOLVER.AMP.PRECISION`` (float16 with a
      GradScaler, or bfloat16; retina_focal/engine/amp.py); ``SOLVER.COMPILE.ENABLED``:
      backbone and head under ``torch.compile`` (retina_focal/engine/compile.py);
    * training data checked once before the first step (``retina_focal.data.checks``) and
      a data stream that ``--resume`` continues exactly (``retina_focal.data.train_stream``);
    * atomic checkpoints that also hold the stream seed (the EMA loss normalizer is the model's own state);
    * ``SOLVER.LOG_PERIOD``; a non-finite loss raises :class:`NonFiniteLossError` naming
      the iteration, the loss term and the checkpoint to resume from, and writes a report.
    """

    def __init__(self, cfg):
        """DefaultTrainer's construction, in its order, with our DDP (CPU-aware), step
        trainer (AMP on any device) and checkpointer."""
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger was not called
            setup_logger()
        # a test set of other classes stops the run now, not at the first evaluation
        check_test_sets(cfg.MODEL.RETINANET.NUM_CLASSES, cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        if cfg.SOLVER.COMPILE.ENABLED:
            compile_dense_network(model)
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
        self.checkpointer.add_checkpointable("run_facts", RunFacts(run_facts(cfg, data_loader), cfg.RESUME.ALLOW_CHANGES))
        if isinstance(data_loader, ResumableTrainLoader):
            self.checkpointer.add_checkpointable("train_stream", data_loader)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = [self._writer_hook(h) if isinstance(h, hooks.PeriodicWriter) else h for h in super().build_hooks()]
        if self.ema is not None:
            ret = [EMAHook(self.ema)] + [self._ema_eval_hook() if isinstance(h, hooks.EvalHook) else h for h in ret]
        if self.cfg.TEST.AUG.ENABLED:  # after the last iteration, also with test-time augmentation
            ret.append(hooks.EvalHook(0, lambda: self._evaluated(self.test_with_TTA)))
        # TEST.VAL_LOSS_PERIOD, SOLVER.BEST_CHECKPOINT_METRIC (retina_focal/engine/hooks.py)
        return insert_diagnostic_hooks(self.cfg, ret, self.checkpointer)

    def _writer_hook(self, default: hooks.PeriodicWriter) -> hooks.PeriodicWriter:
        """The writers hook of ``SOLVER.LOG_PERIOD``, built with the writers of detectron2's
        (``DefaultTrainer.build_hooks`` builds "hooks.PeriodicWriter(self.build_writers(),
        period=20)": the writers' files are open already, so they are reused, not built again)."""
        return hooks.PeriodicWriter(default._writers, period=self.cfg.SOLVER.LOG_PERIOD)

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
        model = unwrap_model(model)
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
        return non_finite_loss_message(report, path)

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
        check_test_sets(cfg.MODEL.RETINANET.NUM_CLASSES, cfg.DATASETS.TRAIN, [dataset_name])
        coco_json_for_evaluation(dataset_name, output_folder)  # VOC and CSV sets
        return evaluator_class(cfg.TEST.EVALUATOR)(
            dataset_name, output_dir=output_folder, score_thresh=cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        )


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


