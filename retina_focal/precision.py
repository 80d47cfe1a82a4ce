"""Mixed precision, asked for one way on every device.

* Training, ``SOLVER.AMP.ENABLED``: :class:`MixedPrecisionTrainer` runs the forward pass
  under ``torch.autocast(device_type, dtype)`` (``SOLVER.AMP.PRECISION``) on CUDA and on
  CPUs alike, and scales the loss with a ``GradScaler`` where float16 needs one.
* Inference, ``TEST.AMP.ENABLED``: RetinaFocal in eval mode runs backbone and head under
  ``torch.autocast(device_type, TEST.AMP.PRECISION)`` (evaluation, ``--eval-only``,
  ``retina-focal-predict``).

The model never opens a disabling autocast around its network: an autocast opened outside
it (this trainer's, detectron2's ``AMPTrainer``'s, a user's) reaches the convolutions. Its
head outputs are cast to float32 and the losses and post-processing run with autocast off
(:func:`full_precision`), so they are float32 under any autocast.
"""
import contextlib
import logging
import platform
import time
from typing import ContextManager, Optional, Tuple

import torch
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer
from detectron2.utils.events import get_event_storage

__all__ = [
    "PRECISIONS",
    "MixedPrecisionTrainer",
    "amp_dtype",
    "autocast",
    "build_step_trainer",
    "cpu_description",
    "cpu_has_bf16_kernels",
    "full_precision",
]

logger = logging.getLogger(__name__)

# SOLVER.AMP.PRECISION / TEST.AMP.PRECISION values; "auto" picks by device (amp_dtype).
PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# /proc/cpuinfo flags that decide how fast low-precision convolutions run on a CPU: without
# avx512_bf16 or amx_bf16, oneDNN emulates bfloat16 (seen here on an AVX2-only EPYC: a 3x3
# conv 50x slower than float32); with AMX a bf16 R-50 training step is 3-4x faster. int8
# convolutions need VNNI (avx_vnni, avx512_vnni) or AMX-INT8 to run much faster than float32.
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16", "amx_int8")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> Tuple[str, str]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty strings where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "", ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", ""), fields.get("flags", "")


def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) for oneDNN."""
    flags = _cpuinfo()[1].split()
    return any(f in flags for f in _BF16_FLAGS)


def cpu_description() -> str:
    """E.g. "AMD EPYC; avx2 yes, avx512f no, ...; torch CPU capability AVX2": what a benchmark
    must print, since low-precision speed depends on these flags."""
    model, flags = _cpuinfo()
    present = flags.split()
    isa = ", ".join(f"{f} {'yes' if f in present else 'no'}" for f in CPU_FLAGS)
    return f"{model or platform.processor() or platform.machine()}; {isa}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def amp_dtype(precision: str, device: str, key: str) -> torch.dtype:
    """The autocast dtype named by ``precision`` ("float16", "bfloat16" or "auto").

    "auto" is float16 on CUDA (tensor cores; the loss is scaled) and bfloat16 on every other
    device: CPUs have bfloat16 kernels (AVX512-BF16, AMX) but few float16 ones, and bfloat16
    keeps float32's exponent range, so it needs no loss scaling.

    Args:
        precision (str): the config value.
        device (str): ``MODEL.DEVICE``, e.g. "cuda", "cuda:1", "cpu".
        key (str): the config key, for the error message.
    """
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {['auto', *PRECISIONS]}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast(device_type, dtype)``, or nothing at all when ``dtype`` is None (an
    autocast opened outside stays in force)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def full_precision(device_type: str) -> ContextManager:
    """Autocast off for ``device_type``: ops run in their inputs' dtypes (float32 here)."""
    return torch.autocast(device_type, enabled=False)


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
        if state_dict.get("grad_scaler"):
            super().load_state_dict(state_dict)
            return
        super(AMPTrainer, self).load_state_dict(state_dict)
        if self.grad_scaler.is_enabled():
            logger.info("The checkpoint has no GradScaler state (saved without float16 AMP): the scaler starts fresh")


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
