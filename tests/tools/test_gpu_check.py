"""tools/gpu_check.py: without CUDA it says so and exits 0; with --device cpu --tiny its code
(parity, AMP training with a GradScaler, the benchmark on the device) runs end to end."""
import os

import pytest
import torch


from tools import gpu_check

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys, tmp_path):
    assert gpu_check.main(["--output-dir", str(tmp_path)]) == 0
    assert "no CUDA device on this machine" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_tiny_run_on_the_cpu_writes_every_section(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## 1. Parity", "## 2. Training", "## 3. Speed"):
        assert heading in text
    assert text.count("| PASS |") == 2  # speed-ups on and off
    assert "| AMP float16 |" in text and "65536 →" in text  # the GradScaler ran, from its initial scale
    assert "| AMP float16 + SOLVER.COMPILE |" in text and "|compiled − eager| / eager" in text
    assert "| train | step, batch 2 @ 64px | RetinaFocal AMP (opt-in) |" in text
    assert "avx512_bf16" in text  # the CPU's flags are part of the machine line


def test_quick_and_full_sizes_on_a_gpu():
    """--quick keeps the sizes of the full check (800 px, batch 8) with fewer iterations and
    rounds; --iters overrides either."""
    full, quick = gpu_check._sizes(gpu_check.parse_args([])), gpu_check._sizes(gpu_check.parse_args(["--quick"]))
    assert (full["image"], full["train_batch"], full["iters"], full["rounds"]) == (800, 8, 50, 5)
    assert (quick["image"], quick["train_batch"], quick["iters"], quick["rounds"]) == (800, 8, 10, 2)
    assert gpu_check._sizes(gpu_check.parse_args(["--quick", "--iters", "4"]))["iters"] == 4


def test_a_section_that_raises_is_reported_and_the_next_one_still_runs(monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(gpu_check, "check_parity", lambda args, sizes: ran.append("parity") or ["| on | 3 | yes | 0 | 0 | PASS |"])

    def broken(args, sizes):
        ran.append("amp")
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu_check, "amp_training_rows", broken)
    monkeypatch.setattr(gpu_check, "speed_table", lambda args, sizes: ran.append("speed") or "| speed table |")
    assert gpu_check.main(["--device", "cpu", "--tiny", "--output-dir", str(tmp_path)]) == 1
    assert ran == ["parity", "amp", "speed"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| on | 3 | yes | 0 | 0 | PASS |" in text and "| speed table |" in text
    assert "**ERROR in amp: RuntimeError: CUDA error: out of memory**" in text
    assert "[amp] started" in capsys.readouterr().out  # progress is printed as the check goes
