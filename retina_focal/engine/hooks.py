"""Training hooks enabled by config: validation losses, and the best checkpoint.

* :class:`ValidationLoss` (``TEST.VAL_LOSS_PERIOD`` > 0): every N iterations and after the
  last, the training losses of RetinaFocal on the ``DATASETS.TEST`` images (test-time
  resize, no flip), logged as ``val_loss_cls``, ``val_loss_box_reg`` and ``val_total_loss``.
* detectron2's ``hooks.BestCheckpointer`` (``SOLVER.BEST_CHECKPOINT_METRIC``, e.g.
  ``bbox/AP``): after each evaluation (``TEST.EVAL_PERIOD`` and after the last iteration),
  ``model_best.pth`` when the metric improves.

:func:`insert_diagnostic_hooks` places them among DefaultTrainer's hooks.
"""
import logging
from typing import Dict, Iterable, List

import torch
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.detection_utils import build_augmentation
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from retina_focal.data.checks import drop_unusable_images, image_check_args
from retina_focal.data.mapper import build_train_mapper
from retina_focal.utils.comm import unwrap_model

__all__ = ["ValidationLoss", "build_validation_loader", "insert_diagnostic_hooks", "validation_losses"]

logger = logging.getLogger(__name__)

VAL_PREFIX = "val_"


def build_validation_loader(cfg) -> Iterable[List[Dict]]:
    """Batches of the ``DATASETS.TEST`` images with their annotations, resized as at test time
    (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``, no flip): the first ``TEST.VAL_LOSS_NUM_IMAGES``
    (0 = all), ``SOLVER.IMS_PER_BATCH`` per batch over all processes, sharded like inference."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TEST, filter_empty=False)
    dicts = drop_unusable_images(dicts, cfg.DATASETS.TEST, **image_check_args(cfg, is_train=False))
    if cfg.TEST.VAL_LOSS_NUM_IMAGES > 0:
        dicts = dicts[: cfg.TEST.VAL_LOSS_NUM_IMAGES]
    mapper = build_train_mapper(cfg, augmentations=build_augmentation(cfg, is_train=False))  # keeps the annotations
    batch_size = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    return build_detection_test_loader(
        dataset=dicts, mapper=mapper, batch_size=batch_size, num_workers=cfg.DATALOADER.NUM_WORKERS
    )


@torch.no_grad()
def validation_losses(model, data_loader: Iterable[List[Dict]]) -> Dict[str, float]:
    """RetinaFocal's loss terms on ``data_loader``'s batches, averaged over the batches of
    all processes, as ``{"val_loss_cls": ..., "val_loss_box_reg": ..., "val_total_loss": ...}``.

    The model state does not change: the model runs in eval mode (BatchNorm uses and keeps
    its running statistics; FrozenBN and GroupNorm, as in every shipped config, compute the
    same as in training) and each batch's losses are divided by its own foreground-anchor
    count (§4.1's normalizer, momentum 0), so the EMA ``loss_normalizer`` of training is
    neither read nor updated. No gradient is computed; the loss terms, anchors and labels
    are the model's own (:meth:`RetinaFocal.labelled_predictions`, :meth:`RetinaFocal.losses_of_levels`).
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}
    num_batches = 0
    try:
        for batch in data_loader:
            anchors, logits, deltas, assignment = model.labelled_predictions(batch)
            normalizer = max(assignment.foreground.sum().item(), 1)
            terms = model.losses_of_levels(anchors, logits, deltas, assignment, normalizer)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            num_batches += 1
    finally:
        model.train(was_training)
    totals: Dict[str, float] = {}
    batches = 0
    for rank_sums, rank_batches in comm.all_gather((sums, num_batches)):
        for name, value in rank_sums.items():
            totals[name] = totals.get(name, 0.0) + value
        batches += rank_batches
    losses = {VAL_PREFIX + name: value / max(batches, 1) for name, value in totals.items()}
    losses[VAL_PREFIX + "total_loss"] = sum(losses.values())
    return losses


class ValidationLoss(HookBase):
    """Log :func:`validation_losses` every ``period`` iterations and after the last one.

    Runs in every process (the batches are sharded; the sums are gathered).
    """

    def __init__(self, period: int, data_loader: Iterable[List[Dict]]):
        """
        Args:
            period (int): iterations between two passes, > 0.
            data_loader: batches of mapped dicts with "image" and "instances"
                (:func:`build_validation_loader`).
        """
        self._period = period
        self._data_loader = data_loader

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period == 0 or next_iter == self.trainer.max_iter:
            losses = validation_losses(self.trainer.model, self._data_loader)
            self.trainer.storage.put_scalars(**losses, smoothing_hint=False)
            logger.info("Validation losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))


def insert_diagnostic_hooks(cfg, hook_list: List[HookBase], checkpointer) -> List[HookBase]:
    """DefaultTrainer's hooks plus, where the config enables them, :class:`ValidationLoss`
    just before ``EvalHook`` and detectron2's ``BestCheckpointer`` just after it (main
    process only), so both run before the writers and the best checkpoint sees the new
    metric. ``model_best.pth`` is a full checkpoint and becomes ``last_checkpoint`` when
    written, as every save does; ``--resume`` then continues from it, the latest state."""
    eval_index = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
    before, after = [], []
    if cfg.TEST.VAL_LOSS_PERIOD > 0:
        before.append(ValidationLoss(cfg.TEST.VAL_LOSS_PERIOD, build_validation_loader(cfg)))
    if cfg.SOLVER.BEST_CHECKPOINT_METRIC and comm.is_main_process():
        after.append(
            hooks.BestCheckpointer(
                cfg.TEST.EVAL_PERIOD,
                checkpointer,
                cfg.SOLVER.BEST_CHECKPOINT_METRIC,
                mode=cfg.SOLVER.BEST_CHECKPOINT_MODE,
            )
        )
    return hook_list[:eval_index] + before + [hook_list[eval_index]] + after + hook_list[eval_index + 1 :]
