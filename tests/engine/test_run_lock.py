"""retina_focal/engine/run_lock.py: one training run per OUTPUT_DIR; a dead run's lock does not hold."""
import json
import os
import socket
import subprocess
import sys

import pytest

from retina_focal.engine.run_lock import LOCK_FILE, OutputDirInUseError, hold_output_dir
from tests.conftest import REPO
from tests.test_train_net import CONFIG, TINY


def _lock_of(pid, tmp_path, host=None):
    lock = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-05T10:00:00"}
    with open(f"/proc/{pid}/stat") as f:
        lock["process_start"] = f.read().rsplit(")", 1)[1].split()[19]
    (tmp_path / LOCK_FILE).write_text(json.dumps(lock))
    return lock


def test_a_live_run_holds_the_output_dir_and_the_message_names_it(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(other.pid, tmp_path)
        with pytest.raises(OutputDirInUseError, match=rf"in use by another training run \(pid {other.pid} on "
                                                      rf"{socket.gethostname()}, started 2026-12-05T10:00:00"):
            hold_output_dir(str(tmp_path))
    finally:
        other.kill()
        other.wait()


def test_the_lock_of_a_dead_run_or_of_this_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    lock = _lock_of(dead.pid, tmp_path)
    dead.wait()
    path = hold_output_dir(str(tmp_path))  # the run was killed: --resume starts
    assert json.loads(open(path).read())["pid"] == os.getpid() != lock["pid"]
    assert hold_output_dir(str(tmp_path)) == path  # setup called again in the same process


@pytest.mark.slow
def test_a_second_training_into_the_same_output_dir_is_refused_and_writes_nothing(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_of(other.pid, tmp_path)
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG,
                               "OUTPUT_DIR", str(tmp_path), *TINY, "SOLVER.MAX_ITER", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        other.kill()
        other.wait()
    assert proc.returncode != 0
    assert f"OutputDirInUseError: OUTPUT_DIR {tmp_path} is in use by another training run (pid {other.pid}" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no config.yaml, log or metrics of the second run
