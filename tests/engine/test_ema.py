"""retina_focal/engine/ema.py (MODEL_EMA.*): the average and its decay ramp, the EMA weights swapped in
and out bitwise, the checkpoint layout (EMA as "model", raw weights kept), evaluation on the
EMA weights, and a 2-process AMP run with EMA."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer, load_inference_weights
from retina_focal.data import register_builtin_shapes
from retina_focal.engine.ema import ModelEMA
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import small_cfg
from tests.test_train_net import TINY, train


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_the_average_follows_the_formula_with_its_decay_ramp():
    model = build_model(small_cfg())
    ema = ModelEMA(model, decay=0.9)
    name = "head.cls_score.bias"
    expected = model.state_dict()[name].clone()
    for step in range(1, 101):
        _perturbed(model, step)
        ema.update()
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.state_dict()[name]
    assert ema.current_decay() == 0.9  # the ramp (1 + t) / (10 + t) reached DECAY at t = 80
    torch.testing.assert_close(ema.shadow[name], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"MODEL_EMA.DECAY must be in \[0, 1\), got 1.0"):
        ModelEMA(model, 1.0)


def test_applied_swaps_the_ema_weights_in_and_the_raw_ones_back_bitwise():
    model = build_model(small_cfg())
    ema = ModelEMA(model, decay=0.5)
    for step in range(3):
        _perturbed(model, step)
        ema.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.shadow.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())


def test_checkpoints_hold_the_ema_weights_as_model_and_resume_restores_both(tmp_path):
    model = build_model(small_cfg())
    ema = ModelEMA(model, decay=0.5)
    for step in range(3):
        _perturbed(model, step)
        ema.update()
    RetinaFocalCheckpointer(model, str(tmp_path), ema=ema).save("model_final")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in ema.shadow.items())  # evaluation / export use these
    assert all(torch.equal(saved["model_ema"]["raw"][k], model.state_dict()[k]) for k in ema.shadow)
    inference = build_model(small_cfg())
    load_inference_weights(inference, str(tmp_path / "model_final.pth"))
    assert torch.equal(inference.head.cls_score.bias, ema.shadow["head.cls_score.bias"])
    resumed = build_model(small_cfg())
    resumed_ema = ModelEMA(resumed, decay=0.5)
    RetinaFocalCheckpointer(resumed, str(tmp_path), ema=resumed_ema).resume_or_load("", resume=True)
    assert all(torch.equal(resumed.state_dict()[k], model.state_dict()[k]) for k in ema.shadow)  # raw weights train on
    assert all(torch.equal(resumed_ema.shadow[k], v) for k, v in ema.shadow.items()) and resumed_ema.num_updates == 3


def test_resuming_a_checkpoint_without_ema_starts_the_average_at_its_weights(tmp_path):
    """RESUME.ALLOW_CHANGES with MODEL_EMA.ENABLED turned on: no "model_ema" in the checkpoint."""
    register_builtin_shapes()
    cfg = small_cfg("OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "DATASETS.TEST", (),
                    "MODEL.RETINANET.NUM_CLASSES", 5, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    plain = RetinaFocalTrainer(cfg)
    _perturbed(plain.model, 0)
    plain.iter = 4
    plain.checkpointer.save("model_0000004")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL_EMA.ENABLED, cfg.RESUME.ALLOW_CHANGES = True, True
    resumed = RetinaFocalTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5 and resumed.ema.num_updates == 0
    assert torch.equal(resumed.ema.shadow["head.cls_score.bias"], plain.model.head.cls_score.bias)


def test_evaluation_during_training_sees_the_ema_weights(tmp_path, monkeypatch):
    register_builtin_shapes()
    cfg = small_cfg("MODEL_EMA.ENABLED", True, "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",),
                    "DATASETS.TEST", ("retina_focal_shapes_tiny_val",), "MODEL.RETINANET.NUM_CLASSES", 5, "SOLVER.IMS_PER_BATCH", 2,
                    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    trainer = RetinaFocalTrainer(cfg)
    seen = []
    monkeypatch.setattr(RetinaFocalTrainer, "test", classmethod(lambda cls, cfg, model: seen.append(model.head.cls_score.bias.clone()) or {}))
    _perturbed(trainer.model, 0)
    trainer.ema.update()
    (hook,) = [h for h in trainer._hooks if type(h).__name__ == "EvalHook"]
    hook._do_eval()
    assert torch.equal(seen[0], trainer.ema.shadow["head.cls_score.bias"])
    assert not torch.equal(trainer.model.head.cls_score.bias, seen[0])  # the raw weights are back


@pytest.mark.slow
def test_two_processes_with_amp_and_ema_train_and_save_the_average(tmp_path):
    proc = train(["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path), "MODEL_EMA.ENABLED", "True",
                  "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()"] + TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    assert saved["model_ema"]["num_updates"] == 3
    assert any(not torch.equal(saved["model"][k], saved["model_ema"]["raw"][k]) for k in saved["model_ema"]["raw"])
