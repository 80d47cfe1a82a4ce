"""Deprecated path, kept for one release: the losses moved to ``retina_focal.modeling.losses``.

``from retina_focal.losses import FocalLoss, sigmoid_focal_loss, ...`` still works and gives
the same objects; new code imports ``retina_focal.modeling.losses``.
"""
from retina_focal.modeling.losses import *  # noqa: F401,F403
from retina_focal.modeling.losses import __all__  # noqa: F401
