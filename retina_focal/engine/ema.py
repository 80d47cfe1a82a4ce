"""Model EMA (``MODEL_EMA.ENABLED``, ``MODEL_EMA.DECAY``; d2go's names): an exponential moving
average of the weights and floating-point buffers, updated after every training step.

* evaluation during training, the final evaluation and ``model_final.pth`` use the EMA
  weights; checkpoints hold them under "model" (:meth:`ModelEMA.averaged_state_dict`, so
  ``--eval-only``, predict and export load them), and the raw weights and the number of
  updates under "model_ema" (:meth:`ModelEMA.state_dict`), whenever the checkpoint is saved;
* ``--resume`` restores both exactly: the EMA weights from "model", then the raw ones;
* the decay ramps up as TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``:
  d_t = min(DECAY, (1 + t) / (10 + t)), so the first steps' random weights fade quickly.

With DDP every process keeps the same average (its model is the same after each step).
"""
import contextlib
from typing import Dict, Iterator

import torch
from detectron2.engine import HookBase
from torch import Tensor, nn

from retina_focal.utils.comm import unwrap_model

__all__ = ["EMAHook", "ModelEMA"]


class ModelEMA:
    """The running average of ``model``'s floating-point state (parameters and buffers).

    Checkpointable (``state_dict``/``load_state_dict``): see the module docstring.
    """

    def __init__(self, model: nn.Module, decay: float):
        """
        Args:
            model (nn.Module): the model being trained (a DDP wrapper is looked through).
            decay (float): the largest decay, in [0, 1); e.g. 0.999.
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
        self.model = unwrap_model(model)
        self.decay = decay
        self.num_updates = 0
        self.shadow: Dict[str, Tensor] = {
            k: v.detach().clone() for k, v in self.model.state_dict().items() if v.dtype.is_floating_point
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the model's current weights (after loading MODEL.WEIGHTS)."""
        state = self.model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])
        self.num_updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: shadow ← d·shadow + (1 − d)·weights."""
        self.num_updates += 1
        decay = self.current_decay()
        state = self.model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.lerp_(state[name].detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for a while (evaluation), then the raw ones back."""
        state = self.model.state_dict()
        raw = {name: state[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, shadow in self.shadow.items():
                    state[name].copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    state[name].copy_(value)

    def averaged_state_dict(self) -> Dict[str, Tensor]:
        """The model's state dict with the EMA in place of every averaged tensor: what a
        checkpoint saves as "model"."""
        return {name: self.shadow.get(name, value) for name, value in self.model.state_dict().items()}

    def state_dict(self) -> Dict:
        """The number of updates and the raw weights (the model's own, not the average)."""
        state = self.model.state_dict()
        return {"num_updates": self.num_updates, "raw": {name: state[name].detach() for name in self.shadow}}

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        """Called after the checkpoint's "model" (the EMA weights) was loaded into the model:
        those become the shadow, and the raw weights go back into the model."""
        current = self.model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.copy_(current[name])
            current[name].copy_(state["raw"][name])
        self.num_updates = int(state["num_updates"])


class EMAHook(HookBase):
    """Update a :class:`ModelEMA` after every training step."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self):
        self.ema.update()
