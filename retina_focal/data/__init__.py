"""Built-in datasets of retina_focal, data checks and the resumable training stream."""
from .checks import check_dataset_dicts, check_num_classes, drop_unusable_images, image_check_args
from .shapes import SHAPE_CLASSES, register_builtin_shapes, register_shapes
from .train_stream import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "SHAPE_CLASSES",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "check_dataset_dicts",
    "check_num_classes",
    "drop_unusable_images",
    "image_check_args",
    "register_builtin_shapes",
    "register_shapes",
]
