"""Datasets (built-in shapes, and COCO / VOC / CSV specs named on the command line), data
checks and the resumable training stream."""
from retina_focal.data.checks import (
    check_dataset_dicts,
    check_num_classes,
    check_same_classes,
    check_test_sets,
    checked_dataset_dicts,
    drop_unusable_images,
    image_check_args,
)
from retina_focal.data.formats import (
    DatasetSpec,
    coco_json_for_evaluation,
    dataset_folder_name,
    register_config_datasets,
    register_dataset,
    resolve_num_classes,
)
from retina_focal.data.shapes import (
    IMBALANCE_LEVELS,
    SHAPE_CLASSES,
    register_builtin_shapes,
    register_imbalance_level,
    register_shapes,
)
from retina_focal.data.train_stream import (
    ResumableTrainLoader,
    build_resumable_train_loader,
)

__all__ = [
    "SHAPE_CLASSES",
    "DatasetSpec",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "check_dataset_dicts",
    "check_num_classes",
    "check_same_classes",
    "check_test_sets",
    "checked_dataset_dicts",
    "coco_json_for_evaluation",
    "dataset_folder_name",
    "drop_unusable_images",
    "IMBALANCE_LEVELS",
    "image_check_args",
    "register_builtin_shapes",
    "register_config_datasets",
    "register_dataset",
    "register_imbalance_level",
    "register_shapes",
    "resolve_num_classes",
]
