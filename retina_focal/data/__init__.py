"""Built-in datasets of retina_focal."""
from .shapes import SHAPE_CLASSES, register_builtin_shapes, register_shapes

__all__ = ["SHAPE_CLASSES", "register_builtin_shapes", "register_shapes"]
