"""Distributed helpers."""
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model
