"""Checkpoints: atomic saves, weights that must fit, and the facts ``--resume`` keeps."""
from retina_focal.checkpoint.checkpointer import *  # noqa: F401,F403
from retina_focal.checkpoint.checkpointer import __all__  # noqa: F401
