"""``SOLVER.COMPILE.ENABLED``: the training step's dense network under ``torch.compile``.

The backbone (with the FPN) and the head, where nearly all of a step's time goes, are compiled
in place with :meth:`torch.nn.Module.compile` (Inductor: fused elementwise ops, and on CUDA the
Triton kernels that fast RetinaNet trainers use), so parameters, state-dict keys, checkpoints,
DDP and the EMA see the same modules. Anchor matching and the losses stay eager: their shapes
change with the number of ground-truth boxes of each batch. The first step (and the first
evaluation) pays the compilation; a new input size compiles again, with dynamic shapes from the
second size on. Results equal eager's up to float rounding (tests/engine/test_compile.py).
"""
import logging

from torch import nn

__all__ = ["compile_dense_network"]

logger = logging.getLogger(__name__)


def compile_dense_network(model: nn.Module) -> None:
    """Compile ``model.backbone`` and ``model.head`` in place."""
    for name in ("backbone", "head"):
        getattr(model, name).compile()
    logger.info("SOLVER.COMPILE.ENABLED: backbone and head compiled by torch.compile (compiled at the first step)")
