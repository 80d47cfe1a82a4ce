"""retina_focal/engine/amp.py: the mixed-precision trainer on a CPU (its dtype, loss scaling,
the GradScaler in checkpoints)."""
import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from retina_focal.engine.amp import MixedPrecisionTrainer
from retina_focal.utils.testing import synthetic_batch
from tests.conftest import small_cfg
from tests.modeling.test_precision import HALF_DTYPES, STD_INPUTS, _conv_dtypes



class _Loader:
    """An endless loader of one fixed synthetic batch."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield copy.deepcopy(self.batch)


# Training images of 128 px, not 64: at 64 px P6 is 1 x 1, and on CPUs with AMX oneDNN's bfloat16
# weight gradient of a 3x3 stride-2 conv on a 1 x 1 input (P7's) is wrong in most calls, with
# values up to 1e29 and infinities (torch 2.14.1; a bare nn.Conv2d under autocast shows it).
AMX_SAFE_SIZE = 128


def _trainer(precision, **scaler_kwargs):
    model = build_model(small_cfg(*STD_INPUTS))
    seen = _conv_dtypes(model.head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    trainer = MixedPrecisionTrainer(model, _Loader(synthetic_batch(2, AMX_SAFE_SIZE, 3)), optimizer, device_type="cpu", precision=precision)
    if scaler_kwargs:
        trainer.grad_scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    return trainer, seen


def _steps(trainer, n):
    with EventStorage() as storage:
        for i in range(n):
            storage.iter = trainer.iter = i
            trainer.run_step()
    return storage


@pytest.mark.slow
@pytest.mark.parametrize("precision", HALF_DTYPES)
def test_amp_trainer_runs_the_forward_in_its_dtype_on_a_cpu(precision):
    trainer, seen = _trainer(precision)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    storage = _steps(trainer, 2)
    assert set(seen) == {precision}
    assert trainer.grad_scaler.is_enabled() == (precision == torch.float16)  # no scaling for bfloat16
    changed = [not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())]
    assert any(changed)  # the optimizer stepped
    history = storage.histories()
    assert ("amp/grad_scale" in history) == (precision == torch.float16)


def test_amp_trainer_skips_a_step_with_inf_gradients_and_backs_off():
    trainer, _ = _trainer(torch.float16, init_scale=2.0**40)  # overflows float16 for sure
    before = [p.detach().clone() for p in trainer.model.parameters()]
    storage = _steps(trainer, 1)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # skipped
    assert trainer.grad_scaler.get_scale() == 2.0**39
    assert storage.history("amp/skipped_steps").latest() == 1


@pytest.mark.slow
def test_amp_trainer_checkpoints_its_grad_scaler():
    trainer, _ = _trainer(torch.float16, init_scale=1024.0, growth_interval=1)
    _steps(trainer, 2)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == trainer.grad_scaler.get_scale() != 65536.0
    fresh, _ = _trainer(torch.float16)
    fresh.load_state_dict(state)
    assert fresh.grad_scaler.state_dict() == trainer.grad_scaler.state_dict()
    float32_state = {"iteration": 1, "optimizer": state["optimizer"]}  # a checkpoint without AMP: scaler starts fresh
    fresh.load_state_dict(float32_state)
