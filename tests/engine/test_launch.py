"""retina_focal/engine/launch.py: a worker ends when its launcher is killed, even one that
would not end on the SIGINT that torch's spawn asks for (a worker stuck in a collective)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # spawns torch processes: `make test` runs it, `make test-fast` does not

LAUNCHER = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch.multiprocessing as mp

    def worker(_, pid_file, end_with_launcher):
        from detectron2.utils import comm
        comm.get_world_size = lambda: 2  # as in a 2-process run
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # deaf to SIGINT, as while blocked in C++
        if end_with_launcher:
            from retina_focal.engine.launch import end_with_launcher as end
            end()
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        mp.start_processes(worker, args=(sys.argv[1], sys.argv[2] == "1"), nprocs=1, start_method="spawn")
    """
)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _worker_after_launcher_killed(tmp_path, end_with_launcher):
    script, pid_file = tmp_path / "launcher.py", tmp_path / "worker.pid"
    script.write_text(LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(script), str(pid_file), str(int(end_with_launcher))],
                                env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_worker_deaf_to_sigint_ends_with_its_launcher(tmp_path):
    assert not _worker_after_launcher_killed(tmp_path, end_with_launcher=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_without_it_such_a_worker_outlives_its_launcher(tmp_path):
    """The case the launcher test met under load: torch's SIGINT alone leaves the worker running."""
    assert _worker_after_launcher_killed(tmp_path, end_with_launcher=False)
