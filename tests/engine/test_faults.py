"""Faults survived: kill -9 then --resume continues bit for bit, DETERMINISTIC runs are
reproducible, a rank that dies ends the job, a rank without annotations trains."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.test_train_net import CONFIG, TINY, losses_by_iteration, train

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

RUN = TINY + ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "10",
              "SOLVER.LOG_PERIOD", "1", "SEED", "3", "DETERMINISTIC", "True"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _weights(out):
    return torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


def _bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    _ok(train(["OUTPUT_DIR", out] + RUN))
    return out


def test_deterministic_mode_gives_bitwise_identical_weights(uninterrupted, tmp_path):
    _ok(train(["OUTPUT_DIR", str(tmp_path)] + RUN))
    assert _bitwise_equal(_weights(uninterrupted), _weights(str(tmp_path)))


def test_kill_9_then_resume_continues_exactly(uninterrupted, tmp_path):
    out = str(tmp_path)
    killed = train(["--fault", "sigkill@12", "OUTPUT_DIR", out] + RUN, script="tests/engine/fault_train.py")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    resumed = train(["--resume", "OUTPUT_DIR", out] + RUN)
    _ok(resumed)
    assert "model_0000009.pth" in resumed.stdout + resumed.stderr  # resumed from the checkpoint at 10
    expected, got = losses_by_iteration(uninterrupted), losses_by_iteration(out)
    assert sorted(got) == list(range(20))
    for it in range(10, 20):
        assert [got[it][k] for k in ("loss_cls", "loss_box_reg", "lr")] == [
            expected[it][k] for k in ("loss_cls", "loss_box_reg", "lr")
        ], it
    assert _bitwise_equal(_weights(uninterrupted), _weights(out))


def test_a_rank_that_raises_ends_the_job_quickly_with_its_error(tmp_path):
    start = time.monotonic()
    proc = train(["--fault", "raise@3:r1", "--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path)] + RUN,
                 script="tests/engine/fault_train.py", timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "Process 1 terminated with the following error" in proc.stderr
    assert "injected fault on rank 1 at iteration 3" in proc.stderr
    assert elapsed < 300, elapsed  # instead of waiting for the 30-minute collective timeout


def test_a_rank_whose_images_have_no_annotations_trains_to_the_end(tmp_path):
    out = str(tmp_path)
    proc = train(["--fault", "empty:r1", "--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", out]
                 + RUN + ["SOLVER.MAX_ITER", "4"], script="tests/engine/fault_train.py", timeout=600)
    _ok(proc)
    rows = losses_by_iteration(out)
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows.values() for k in ("loss_cls", "loss_box_reg"))
    assert os.path.exists(os.path.join(out, "model_final.pth"))


def _state_and_parent(pid):
    """(state, parent pid) of a process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def _is_live(stat):
    """A zombie has ended: its /proc entry only waits for a reaper."""
    return stat is not None and stat[0] != "Z"


def _running(pid):
    return _is_live(_state_and_parent(pid))


def _live_children(pid):
    """Processes whose parent is ``pid`` and that are not zombies (Linux /proc)."""
    stats = {int(e): _state_and_parent(e) for e in os.listdir("/proc") if e.isdigit()}
    return [child for child, st in stats.items() if _is_live(st) and st[1] == pid]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_killing_the_launcher_ends_its_worker_processes(tmp_path):
    """A pre-empted launcher must not leave its workers training as orphans (PyTorch's spawn
    sets a parent-death signal on Linux; this guards that the workers really end)."""
    out = str(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, "--num-gpus", "2",
         "--dist-url", "auto", "OUTPUT_DIR", out] + RUN + ["SOLVER.MAX_ITER", "100000"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers = []
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(out, "metrics.json")) and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = _live_children(launcher.pid)
        assert len(workers) >= 2 and launcher.poll() is None, "training did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_running(w) for w in workers), "workers outlived the launcher"
    finally:
        launcher.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _copy_checkpoints(src, dst, names, tagged):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    with open(os.path.join(dst, "last_checkpoint"), "w") as f:
        f.write(tagged)
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (["SOLVER.IMS_PER_BATCH", "2"], "SOLVER.IMS_PER_BATCH was 4, now 2"),
        (["SOLVER.MAX_ITER", "30"], "SOLVER.MAX_ITER was 20, now 30"),
        (["SOLVER.STEPS", "(5,)"], "SOLVER.STEPS was [800, 1067], now [5]"),
        (["DATASETS.TRAIN", '("retina_focal_shapes_tiny_val",)'],
         "DATASETS.TRAIN was ['retina_focal_shapes_tiny_train'], now ['retina_focal_shapes_tiny_val']"),
        (["MODEL_EMA.ENABLED", "True"], "MODEL_EMA.ENABLED was False, now True"),
    ],
)
def test_resume_refuses_what_it_cannot_continue_exactly(uninterrupted, tmp_path, change, message):
    """Used to resume silently: a new batch size restarted the stream at the wrong image."""
    out = _copy_checkpoints(uninterrupted, str(tmp_path / "run"), ["model_0000009.pth"], "model_0000009.pth")
    proc = train(["--resume", "OUTPUT_DIR", out] + RUN + change)
    assert proc.returncode != 0
    assert f"--resume cannot continue this run exactly: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "RESUME.ALLOW_CHANGES True" in proc.stderr


def test_resume_with_allowed_changes_continues_at_the_image_position(uninterrupted, tmp_path):
    out = _copy_checkpoints(uninterrupted, str(tmp_path / "run"), ["model_0000009.pth"], "model_0000009.pth")
    proc = train(["--resume", "OUTPUT_DIR", out] + RUN + ["SOLVER.IMS_PER_BATCH", "2", "RESUME.ALLOW_CHANGES", "True"])
    _ok(proc)
    log = proc.stdout + proc.stderr
    assert "RESUME.ALLOW_CHANGES: resuming although SOLVER.IMS_PER_BATCH was 4, now 2" in log
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["train_stream"]["images_consumed"] == 10 * 4 + 10 * 2


def test_a_truncated_last_checkpoint_names_the_previous_one_which_resumes_exactly(uninterrupted, tmp_path):
    out = _copy_checkpoints(uninterrupted, str(tmp_path / "run"), ["model_0000009.pth", "model_final.pth"],
                            "model_final.pth")
    final = os.path.join(out, "model_final.pth")
    with open(final, "rb") as f:
        data = f.read()
    with open(final, "wb") as f:
        f.write(data[: len(data) // 3])
    proc = train(["--resume", "OUTPUT_DIR", out] + RUN)
    assert proc.returncode != 0
    assert f"Checkpoint {final} ({len(data) // 3} bytes) cannot be read" in proc.stderr, proc.stderr[-3000:]
    assert "to resume from it, add --resume RESUME.CHECKPOINT model_0000009.pth" in proc.stderr
    _ok(train(["--resume", "OUTPUT_DIR", out] + RUN + ["RESUME.CHECKPOINT", "model_0000009.pth"]))
    assert _bitwise_equal(_weights(uninterrupted), _weights(out))


EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9"]


@pytest.fixture(scope="module")
def uninterrupted_ema(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted_ema"))
    _ok(train(["OUTPUT_DIR", out] + RUN + EMA))
    return out


def test_kill_9_then_resume_with_ema_continues_exactly(uninterrupted_ema, tmp_path):
    """MODEL_EMA: the checkpoint's EMA weights ("model") and raw weights both continue bit for bit."""
    out = str(tmp_path)
    killed = train(["--fault", "sigkill@12", "OUTPUT_DIR", out] + RUN + EMA, script="tests/engine/fault_train.py")
    assert killed.returncode == -9, killed.stderr[-3000:]
    _ok(train(["--resume", "OUTPUT_DIR", out] + RUN + EMA))
    expected, got = (torch.load(os.path.join(d, "model_final.pth"), map_location="cpu", weights_only=False)
                     for d in (uninterrupted_ema, out))
    assert _bitwise_equal(expected["model"], got["model"])  # the EMA weights
    assert _bitwise_equal(expected["model_ema"]["raw"], got["model_ema"]["raw"])
    assert got["model_ema"]["num_updates"] == 20
    assert not _bitwise_equal(expected["model"], expected["model_ema"]["raw"])
