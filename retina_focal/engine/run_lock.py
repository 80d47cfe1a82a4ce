"""One training run per OUTPUT_DIR at a time.

Two trainings writing one OUTPUT_DIR interleave ``metrics.json``, overwrite each other's
checkpoints and ``last_checkpoint`` and trip over each other's ``.partial`` files. The main
process of a training run holds ``OUTPUT_DIR/train.lock`` (its pid, host, the process's start
time and when the run began) from ``setup`` until it exits. A second run refuses to start with
a message naming the first; a lock whose process is gone (a run killed with ``kill -9``, a
crash) does not hold, so ``--resume`` after a kill starts as usual. A lock written on another
host cannot be checked from here: it holds until its file is deleted.
"""
import atexit
import datetime
import json
import logging
import os
import socket
from typing import Dict, Optional

__all__ = ["LOCK_FILE", "OutputDirInUseError", "hold_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class OutputDirInUseError(RuntimeError):
    """Another live training run holds the OUTPUT_DIR."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks after boot (/proc/<pid>/stat, field 22),
    so a pid reused by another process is not taken for the run; None when there is no such
    live process (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _this_run() -> Dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _holds(lock: Dict) -> bool:
    """Whether the run that wrote ``lock`` may still be running."""
    if lock.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    return _process_start(int(lock.get("pid", -1))) == lock.get("process_start")


def _read(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half written: treated as held by nobody


def hold_output_dir(output_dir: str) -> str:
    """Take ``output_dir``'s lock for this process until it exits (released by ``atexit``).

    Raises:
        OutputDirInUseError: a live run holds it (the message names its pid, host and start).
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    mine = _this_run()
    held = _read(path)
    if held and (held.get("pid"), held.get("host")) != (mine["pid"], mine["host"]) and _holds(held):
        raise OutputDirInUseError(
            f"OUTPUT_DIR {output_dir} is in use by another training run (pid {held.get('pid')} on {held.get('host')}, "
            f"started {held.get('started')}; {path}). Wait for it, give this run another OUTPUT_DIR, or delete the "
            "lock file if that run has ended on another host"
        )
    if held:
        logger.warning(f"{path}: the run that held it (pid {held.get('pid')}, started {held.get('started')}) has ended; taking it over")
    tmp = f"{path}.{mine['pid']}"
    with open(tmp, "w") as f:
        json.dump(mine, f)
    os.replace(tmp, path)
    atexit.register(_release, path, mine["pid"])
    return path


def _release(path: str, pid: int) -> None:
    """Remove the lock if it is still this process's."""
    held = _read(path)
    if held and held.get("pid") == pid and held.get("host") == socket.gethostname():
        os.remove(path)
