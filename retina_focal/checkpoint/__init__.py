"""Checkpoints: atomic saves, weights that must fit, the facts ``--resume`` keeps, and
torchvision's ImageNet weights by name (``torchvision://<model>``, registered here)."""
from retina_focal.checkpoint.checkpointer import *  # noqa: F401,F403
from retina_focal.checkpoint.checkpointer import __all__  # noqa: F401
from retina_focal.checkpoint.torchvision_weights import find_torchvision_weights  # noqa: F401  (registers torchvision://)
