"""Deprecated path, kept for one release: the head moved to ``retina_focal.modeling.head``.

``retina_focal.head.conv_tower``, ``prior_bias`` and the registry names still work and are the same objects.
"""
from retina_focal.modeling.head import *  # noqa: F401,F403
from retina_focal.modeling.head import __all__, conv_tower, prior_bias  # noqa: F401
