"""Mixed-precision training on any device (``SOLVER.AMP.ENABLED``, ``SOLVER.AMP.PRECISION``).

:class:`MixedPrecisionTrainer` runs the forward pass under ``torch.autocast(device_type,
dtype)`` on CUDA and on CPUs alike and scales the loss with a ``GradScaler`` where float16
needs one; :func:`build_step_trainer` picks it or detectron2's ``SimpleTrainer``. What the
model does under autocast is retina_focal/modeling/precision.py.
"""
import logging
import time

import torch
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer
from detectron2.utils.events import get_event_storage

from retina_focal.modeling.precision import amp_dtype

__all__ = ["MixedPrecisionTrainer", "build_step_trainer"]

logger = logging.getLogger(__name__)


class MixedPrecisionTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` on any device: CUDA or CPU, float16 or bfloat16.

    detectron2's asserts CUDA and always scales the loss; this one opens
    ``torch.autocast(device_type, precision)`` and scales the loss only for float16, whose
    gradients underflow without it (bfloat16 has float32's range). Checkpoints hold the
    GradScaler state under the same key as detectron2's (``grad_scaler``). Logged per
    iteration when a scaler runs: ``amp/grad_scale`` and ``amp/skipped_steps`` (steps of
    this process skipped for inf/NaN gradients since it started).
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str, precision: torch.dtype):
        """
        Args:
            model, data_loader, optimizer: as ``SimpleTrainer``.
            device_type (str): "cuda", "cpu", ... (``torch.device(MODEL.DEVICE).type``).
            precision (torch.dtype): torch.float16 or torch.bfloat16.
        """
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
        self.device_type = device_type
        self.num_skipped_steps = 0

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)  # raises FloatingPointError on a non-finite loss
        self._scaled_step()

    def _scaled_step(self) -> None:
        """Optimizer step through the scaler (skipped when a gradient is inf/NaN), scaler update."""
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if not self.grad_scaler.is_enabled():
            return
        self.num_skipped_steps += int(self.grad_scaler.get_scale() < scale)  # backoff = skipped
        storage = get_event_storage()
        storage.put_scalar("amp/grad_scale", scale, smoothing_hint=False)
        storage.put_scalar("amp/skipped_steps", self.num_skipped_steps, smoothing_hint=False)

    def load_state_dict(self, state_dict):
        """Restore the optimizer and, when the checkpoint has one, the GradScaler. A checkpoint
        of a run without float16 AMP has none (or an empty one): the scaler then starts fresh,
        and the log says so."""
        if not state_dict.get("grad_scaler"):
            if self.grad_scaler.is_enabled():
                logger.info("The checkpoint has no GradScaler state (saved without float16 AMP): the scaler starts fresh")
            # the scaler's own state: loading it changes nothing (a disabled scaler loads nothing)
            state_dict = {**state_dict, "grad_scaler": self.grad_scaler.state_dict()}
        super().load_state_dict(state_dict)


def build_step_trainer(model, data_loader, optimizer, *, amp: bool, precision: str, device: str, key: str) -> SimpleTrainer:
    """What runs one iteration: detectron2's ``SimpleTrainer``, or with ``amp`` a
    :class:`MixedPrecisionTrainer` on ``device``'s type in ``amp_dtype(precision)``.

    Args:
        amp (bool): ``SOLVER.AMP.ENABLED`` (or a LazyConfig's ``train.amp.enabled``).
        precision (str): "float16", "bfloat16" or "auto"; ``key`` names it in errors.
        device (str): the model's device, e.g. "cuda", "cpu".
    """
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    dtype = amp_dtype(precision, device, key)
    device_type = torch.device(device).type
    logger.info(f"mixed precision ({key} {precision!r}): training under torch.autocast({device_type!r}, {dtype})")
    return MixedPrecisionTrainer(model, data_loader, optimizer, device_type=device_type, precision=dtype)
