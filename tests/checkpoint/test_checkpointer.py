"""Atomic checkpoint files, the classifier-size check, attribute checkpointables, weights that
must fit for inference, truncated checkpoints and the facts a resume must keep."""
import os
import subprocess
import sys

import pytest
import torch

from retina_focal.checkpoint import AtomicFile, RetinaFocalCheckpointer, RunFacts
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import REPO, small_cfg


def _model(*opts):
    return RetinaFocalTrainer.build_model(small_cfg(*opts))


def _tagged(save_dir):
    with open(os.path.join(save_dir, "last_checkpoint")) as f:
        return f.read()


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "f.txt")
    with AtomicFile(path, "w") as f:
        f.write("good")
    with pytest.raises(RuntimeError):
        with AtomicFile(path, "w") as f:
            f.write("partial")
            raise RuntimeError("crash while writing")
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_failed_save_keeps_the_previous_checkpoint_tagged_and_loadable(tmp_path, monkeypatch):
    model = _model()
    ckpt = RetinaFocalCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000009")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def save_half_then_crash(obj, f, *args, **kwargs):
        f.write(b"\x80\x02 truncated pickle")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="No space"):
        ckpt.save("model_0000019")
    monkeypatch.undo()
    assert _tagged(tmp_path) == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    fresh = _model()
    RetinaFocalCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())


KILL_MID_SAVE = r"""
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
from tests.checkpoint.test_checkpointer import _model
from retina_focal.checkpoint import RetinaFocalCheckpointer
ckpt = RetinaFocalCheckpointer(_model(), {out!r})
ckpt.save("model_0000009")
def killed_while_writing(obj, f, *a, **k):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_while_writing
ckpt.save("model_0000019")
"""


@pytest.mark.slow
def test_kill_during_save_then_resume_from_the_previous_checkpoint(tmp_path):
    out = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE.format(repo=REPO, out=out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _tagged(out) == "model_0000009.pth"
    assert not os.path.exists(os.path.join(out, "model_0000019.pth"))  # only a .partial file
    model = _model()
    ckpt = RetinaFocalCheckpointer(model, out)
    assert ckpt.get_checkpoint_file() == os.path.join(out, "model_0000009.pth")
    ckpt.resume_or_load("", resume=True)  # loads without error


def test_classifier_for_another_number_of_classes_is_an_error_that_says_how(tmp_path):
    source = _model("MODEL.RETINANET.NUM_CLASSES", 5)
    RetinaFocalCheckpointer(source, str(tmp_path)).save("five_classes")
    path = str(tmp_path / "five_classes.pth")
    with pytest.raises(ValueError, match=r"5 classes, the model has 3.*REINIT_MISMATCHED_CLASSIFIER True"):
        RetinaFocalCheckpointer(_model()).load(path)
    target = _model()
    new_classifier = target.head.cls_score.weight.clone()
    RetinaFocalCheckpointer(target, reinit_mismatched_classifier=True).load(path)
    assert torch.equal(target.head.cls_score.weight, new_classifier)
    assert torch.equal(target.head.bbox_pred.weight, source.head.bbox_pred.weight)


def test_the_loss_normalizer_is_a_state_dict_entry_of_the_model(tmp_path):
    model = _model()
    model.loss_normalizer.fill_(42.5)
    RetinaFocalCheckpointer(model, str(tmp_path)).save("model_final")
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]["loss_normalizer"].item() == 42.5
    other = _model()
    RetinaFocalCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert other.loss_normalizer.item() == 42.5 and other.loss_normalizer.dtype == torch.float64


def test_a_checkpoint_of_the_old_layout_restores_the_loss_normalizer(tmp_path):
    """Before 0.2 the trainer saved it beside the model, as {"loss_normalizer": {"loss_normalizer": x}}."""
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "loss_normalizer"}
    torch.save({"model": state, "loss_normalizer": {"loss_normalizer": 42.5}, "iteration": 9}, tmp_path / "old.pth")
    other = _model()
    extra = RetinaFocalCheckpointer(other, for_inference=True).load(str(tmp_path / "old.pth"))
    assert other.loss_normalizer.item() == 42.5 and "loss_normalizer" not in extra


def test_weights_without_a_loss_normalizer_load_strictly_and_keep_its_start_value():
    """detectron2's RetinaNet state dicts have no loss_normalizer."""
    model = _model()
    state = {k: v for k, v in _model().state_dict().items() if k != "loss_normalizer"}
    assert model.load_state_dict(state, strict=True).missing_keys == []
    assert model.loss_normalizer.item() == 100.0


def test_inference_refuses_a_classifier_for_another_number_of_classes_without_suggesting_reinit(tmp_path):
    RetinaFocalCheckpointer(_model("MODEL.RETINANET.NUM_CLASSES", 5), str(tmp_path)).save("five_classes")
    with pytest.raises(ValueError, match="5 classes, the model has 3") as error:
        RetinaFocalCheckpointer(_model(), for_inference=True, reinit_mismatched_classifier=True).load(
            str(tmp_path / "five_classes.pth")
        )
    assert "REINIT_MISMATCHED_CLASSIFIER" not in str(error.value)
    assert "Evaluate it with the config it was trained with" in str(error.value)


def _partial_checkpoint(tmp_path):
    """A checkpoint of the model without its head: the backbone only."""
    state = {k: v for k, v in _model().state_dict().items() if not k.startswith("head.")}
    path = str(tmp_path / "backbone_only.pth")
    torch.save({"model": state}, path)
    num_head = sum(1 for k in _model().state_dict() if k.startswith("head."))
    return path, num_head


def test_inference_refuses_weights_that_leave_tensors_unloaded(tmp_path):
    path, num_head = _partial_checkpoint(tmp_path)
    total = len(_model().state_dict())
    with pytest.raises(ValueError, match=rf"does not fit the model: {num_head} of the model's {total} tensors are not in it \(head\."):
        RetinaFocalCheckpointer(_model(), for_inference=True).load(path)


def test_training_from_weights_with_missing_tensors_works_and_logs_one_line(tmp_path, caplog):
    path, num_head = _partial_checkpoint(tmp_path)
    total = len(_model().state_dict())
    with caplog.at_level("WARNING", logger="retina_focal.checkpoint.checkpointer"):
        RetinaFocalCheckpointer(_model()).load(path)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "retina_focal.checkpoint.checkpointer"]
    assert line.startswith(f"Loaded {total - num_head} of the model's {total} tensors from {path}; {num_head} keep their initialization (head.")


def test_a_truncated_checkpoint_names_the_file_and_the_previous_one(tmp_path):
    ckpt = RetinaFocalCheckpointer(_model(), str(tmp_path))
    for name in ("model_0000004", "model_0000009", "model_final"):
        ckpt.save(name)
    for name in ("model_0000009.pth", "model_final.pth"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(ValueError) as error:
            RetinaFocalCheckpointer(_model(), str(tmp_path)).load(str(path))
        message = str(error.value)
        assert message.startswith(f"Checkpoint {path} (1000 bytes) cannot be read: RuntimeError: PytorchStreamReader")
        previous = "model_0000004.pth" if name == "model_0000009.pth" else "model_0000009.pth"
        assert f"The previous checkpoint is {tmp_path / previous}: to resume from it, add --resume RESUME.CHECKPOINT {previous}" in message


def test_run_facts_refuse_a_changed_run_unless_allowed(caplog):
    saved = RunFacts({"SOLVER.IMS_PER_BATCH": 2, "SOLVER.STEPS": (6, 8), "number of processes": 1}).state_dict()
    RunFacts({"SOLVER.IMS_PER_BATCH": 2, "SOLVER.STEPS": [6, 8], "number of processes": 1}).load_state_dict(saved)
    changed = RunFacts({"SOLVER.IMS_PER_BATCH": 4, "SOLVER.STEPS": (6, 9), "number of processes": 1})
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH was 2, now 4; SOLVER.STEPS was \[6, 8\], now \[6, 9\]\..*RESUME.ALLOW_CHANGES"):
        changed.load_state_dict(saved)
    allowed = RunFacts({"SOLVER.IMS_PER_BATCH": 4}, allow_changes=True)
    with caplog.at_level("WARNING", logger="retina_focal.checkpoint.checkpointer"):
        allowed.load_state_dict(saved)
    assert allowed.changed == {"SOLVER.IMS_PER_BATCH": [2, 4]}
    assert "RESUME.ALLOW_CHANGES: resuming although SOLVER.IMS_PER_BATCH was 2, now 4" in caplog.text


def test_a_save_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """ENOSPC during torch.save ended with "unexpected pos ..." and nothing else."""
    import shutil
    from collections import namedtuple

    model = _model()
    checkpointer = RetinaFocalCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009")

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1048576 vs 1048512")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(RuntimeError, match="unexpected pos") as error:
        checkpointer.save("model_0000019")
    note = "\n".join(error.value.__notes__)
    assert f"while saving the checkpoint {tmp_path}/model_0000019.pth (0 MiB free on its disk; the disk is full" in note
    assert open(tmp_path / "last_checkpoint").read() == "model_0000009.pth"
    assert not os.path.exists(tmp_path / "model_0000019.pth.partial")
