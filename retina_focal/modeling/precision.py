"""Mixed precision, asked for one way on every device.

* Training, ``SOLVER.AMP.ENABLED``: the trainer (retina_focal/engine/amp.py) runs the forward pass
  under ``torch.autocast(device_type, dtype)`` (``SOLVER.AMP.PRECISION``) on CUDA and on
  CPUs alike, and scales the loss with a ``GradScaler`` where float16 needs one.
* Inference, ``TEST.AMP.ENABLED``: RetinaFocal in eval mode runs backbone and head under
  ``torch.autocast(device_type, TEST.AMP.PRECISION)`` (evaluation, ``--eval-only``,
  ``retina-focal-predict``).

The model never opens a disabling autocast around its network: an autocast opened outside
it (the AMP trainer's, detectron2's ``AMPTrainer``'s, a user's) reaches the convolutions. Its
head outputs are cast to float32 and the losses and post-processing run with autocast off
(:func:`full_precision`), so they are float32 under any autocast.
"""
import contextlib
from typing import ContextManager, Optional

import torch

__all__ = ["PRECISIONS", "amp_dtype", "autocast", "full_precision"]

# SOLVER.AMP.PRECISION / TEST.AMP.PRECISION values; "auto" picks by device (amp_dtype).
PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


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


