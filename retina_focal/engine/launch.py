"""Processes started by detectron2's ``launch`` end when their launcher ends.

torch's spawn (which ``launch`` uses for more than one process) asks the kernel for SIGINT when
the launcher dies (``_prctl_pr_set_pdeathsig(signal.SIGINT)`` in ``torch.multiprocessing.spawn``).
On SIGINT a worker unwinds as after Ctrl-C and tears down its process group at exit; a peer's
collective that is still in flight (DDP's gradient all-reduce) then waits for a process that is
gone, up to the 30-minute collective timeout, so a pre-empted launcher can leave its workers
alive, holding the CPU or GPU. :func:`end_with_launcher` asks for SIGKILL instead. Checkpoints
are written atomically (retina_focal/checkpoint), so a kill loses only the iterations since
the last one, as a crash would.
"""
import ctypes
import multiprocessing
import os
import signal
import sys

from detectron2.utils import comm

__all__ = ["end_with_launcher"]

_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent thread ends


def end_with_launcher() -> None:
    """In a worker of a multi-process run (world size > 1, Linux), be killed (SIGKILL) when the
    launcher dies; if it has died already, die now. Elsewhere (one process, other systems) nothing."""
    parent = multiprocessing.parent_process()
    if comm.get_world_size() <= 1 or parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGKILL) failed")
    if os.getppid() != parent.pid:  # the launcher ended before the request: nobody would signal
        os.kill(os.getpid(), signal.SIGKILL)
