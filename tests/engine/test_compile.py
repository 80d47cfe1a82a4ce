"""SOLVER.COMPILE.ENABLED (retina_focal/engine/compile.py): backbone and head run compiled by
torch.compile, with the eager model's losses and gradients (float rounding) and its state-dict
keys; the trainer turns it on from the key."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from retina_focal.config.load import load_config
from retina_focal.engine.compile import compile_dense_network
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.utils.testing import synthetic_batch
from tests.conftest import REPO, small_cfg

pytestmark = pytest.mark.slow  # compiles a network (about a minute): `make test` runs it, `make test-fast` does not


def _losses_and_grads(model, batch):
    model.zero_grad()
    with EventStorage():  # the training forward logs its assignment metrics
        losses = model(batch)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_compiled_training_step_equals_the_eager_one():
    cfg = small_cfg()
    torch.manual_seed(0)
    eager = build_model(cfg).train()
    compiled = build_model(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compile_dense_network(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints load either way
    batch = synthetic_batch(2, 128, cfg.MODEL.RETINANET.NUM_CLASSES)
    torch._dynamo.utils.counters.clear()
    got_losses, got_grads = _losses_and_grads(compiled, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # backbone and head ran compiled
    want_losses, want_grads = _losses_and_grads(eager, batch)
    for key, want in want_losses.items():
        assert torch.allclose(got_losses[key], want, rtol=1e-4), (key, got_losses[key], want)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        error = float((got_grads[name] - want).abs().max() / want.abs().max().clamp(min=1e-12))
        assert error < 1e-3, (name, error)


def test_the_trainer_compiles_from_the_key(tmp_path):
    demo = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")
    opts = ["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", (),
            "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 1]
    plain = RetinaFocalTrainer(load_config(demo, opts))
    assert plain.model.backbone._compiled_call_impl is None
    trainer = RetinaFocalTrainer(load_config(demo, opts + ["SOLVER.COMPILE.ENABLED", True]))
    assert trainer.model.backbone._compiled_call_impl is not None and trainer.model.head._compiled_call_impl is not None
