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
    assert "| train | step, batch 2 @ 64px | RetinaFocal AMP (opt-in) |" in text
    assert "avx512_bf16" in text  # the CPU's flags are part of the machine line
