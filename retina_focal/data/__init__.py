"""Built-in datasets of retina_focal, data checks and the resumable training stream."""
from .checks import check_dataset_dicts, check_num_classes
from .shapes import SHAPE_CLASSES, register_builtin_shapes, register_shapes
from .train_stream import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "SHAPE_CLASSES",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "check_dataset_dicts",
    "check_num_classes",
    "register_builtin_shapes",
    "register_shapes",
]
