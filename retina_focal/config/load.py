"""Loading a config: detectron2's defaults, ``MODEL.RETINA_FOCAL``, the file and the
overrides; then what the datasets decide (the dataset specs registered, ``NUM_CLASSES 0``
resolved, class-balanced α)."""
import logging
from typing import List, Optional, Sequence, Tuple

from detectron2.config import CfgNode, get_cfg
from detectron2.data import get_detection_dataset_dicts

from retina_focal.config.defaults import add_retina_focal_config
from retina_focal.data import (
    register_builtin_shapes,
    register_config_datasets,
    resolve_num_classes,
)
from retina_focal.model_zoo.model_zoo import find_config_file
from retina_focal.modeling.losses import class_balanced_alpha

__all__ = ["config_and_notes", "load_config"]

logger = logging.getLogger(__name__)


def load_config(config_file: str, opts: Sequence = (), *, for_inference: bool = False) -> CfgNode:
    """detectron2's defaults + ``MODEL.RETINA_FOCAL`` + ``config_file`` (a path, or the name of
    a packaged config: ``retina_focal.model_zoo``) + ``KEY VALUE``
    overrides, not frozen. Registers the built-in shapes datasets and the dataset specs
    (``coco:``, ``voc:``, ``csv:``, retina_focal/data/formats.py) the config names, and
    resolves ``MODEL.RETINANET.NUM_CLASSES 0`` to the training set's number of classes. With
    ``for_inference`` (predict, export) datasets that are not on this machine are left out, and
    the training-only class-balanced α is not computed: a run's config.yaml works without its
    training data once NUM_CLASSES is a number."""
    cfg, notes = config_and_notes(config_file, opts, for_inference=for_inference)
    for note in notes:
        logger.info(note)
    return cfg


def config_and_notes(config_file: str, opts: Sequence = (), *, for_inference: bool = False) -> Tuple[CfgNode, List[str]]:
    """:func:`load_config`'s config, and what it registered and resolved (for the log)."""
    register_builtin_shapes()
    cfg = get_cfg()
    add_retina_focal_config(cfg)
    cfg.merge_from_file(find_config_file(config_file))
    cfg.merge_from_list(list(opts))
    _check_torchvision_input(cfg)
    notes = register_config_datasets(cfg, skip_missing=for_inference and cfg.MODEL.RETINANET.NUM_CLASSES != 0)
    notes.append(resolve_num_classes(cfg))
    if not for_inference:
        notes.append(_resolve_class_balanced_alpha(cfg))
    notes.append(_resolve_tta_sizes(cfg))
    return cfg, [n for n in notes if n]


def _resolve_class_balanced_alpha(cfg) -> Optional[str]:
    """``LOSS.CLASS_BALANCED_BETA`` > 0 with an empty ``CLASS_ALPHA``: set ``CLASS_ALPHA`` from
    the training boxes per class (``losses.class_balanced_alpha``); returns the log line."""
    beta, loss_cfg = cfg.MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA, cfg.MODEL.RETINA_FOCAL.LOSS
    if beta == 0 or loss_cfg.CLASS_ALPHA:
        return None
    counts = [0] * cfg.MODEL.RETINANET.NUM_CLASSES
    for record in get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False):
        for ann in record.get("annotations", []):
            if not ann.get("iscrowd", 0) and 0 <= ann["category_id"] < len(counts):
                counts[ann["category_id"]] += 1
    loss_cfg.CLASS_ALPHA = class_balanced_alpha(counts, cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA, beta)
    _warn_extreme_alpha(loss_cfg.CLASS_ALPHA, counts, beta)
    return f"LOSS.CLASS_BALANCED_BETA {beta}: boxes per class {counts} -> CLASS_ALPHA {list(loss_cfg.CLASS_ALPHA)}"


def _check_torchvision_input(cfg) -> None:
    """torchvision's weights (``MODEL.WEIGHTS torchvision://...``) were trained on RGB images:
    a BGR ``INPUT.FORMAT`` would feed them swapped channels (the normalization is checked when
    the weights load: retina_focal/checkpoint)."""
    if str(cfg.MODEL.WEIGHTS).startswith("torchvision://") and cfg.INPUT.FORMAT != "RGB":
        raise ValueError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} holds weights trained on RGB images, but INPUT.FORMAT is "
            f"{cfg.INPUT.FORMAT!r}: set INPUT.FORMAT RGB (and torchvision's MODEL.PIXEL_MEAN / PIXEL_STD)"
        )


def _resolve_tta_sizes(cfg) -> Optional[str]:
    """``TEST.AUG`` sizes that are detectron2's defaults (short sides 400-1200 around its 800-px
    test size, long side 4000) follow the config's test size: scaled by ``INPUT.MIN_SIZE_TEST`` /
    800 and ``INPUT.MAX_SIZE_TEST`` / 1333, so TTA on the 128-px demo runs 64-192 px, not
    400-1200 px (18 passes at up to 9x the demo's side). Sizes set to anything else are kept."""
    aug, d2 = cfg.TEST.AUG, get_cfg()
    if not aug.ENABLED or tuple(aug.MIN_SIZES) != tuple(d2.TEST.AUG.MIN_SIZES) or aug.MAX_SIZE != d2.TEST.AUG.MAX_SIZE:
        return None
    short, long = cfg.INPUT.MIN_SIZE_TEST / d2.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST / d2.INPUT.MAX_SIZE_TEST
    if short == long == 1:
        return None
    aug.MIN_SIZES = tuple(sorted({max(1, round(s * short)) for s in d2.TEST.AUG.MIN_SIZES}))
    aug.MAX_SIZE = max(1, round(d2.TEST.AUG.MAX_SIZE * long))
    return (f"TEST.AUG: detectron2's default sizes scaled to INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} / MAX_SIZE_TEST "
            f"{cfg.INPUT.MAX_SIZE_TEST}: MIN_SIZES {list(aug.MIN_SIZES)}, MAX_SIZE {aug.MAX_SIZE} (set them to keep others)")


_EXTREME_ALPHA = 0.01  # below it a class's positives (α) or, from 1 - it, its negatives (1 − α) all but vanish from the loss


def _warn_extreme_alpha(alphas, counts, beta) -> None:
    """Warn about classes whose class-balanced α reached 1 (their negatives weigh 0) or about 0
    (their positives weigh nothing)."""
    extreme = [(k, a, n) for k, (a, n) in enumerate(zip(alphas, counts)) if a >= 1.0 - _EXTREME_ALPHA or a <= _EXTREME_ALPHA]
    if extreme:
        listed = ", ".join(f"class {k} ({n} boxes): α {a}" for k, a, n in extreme)
        logger.warning(
            f"LOSS.CLASS_BALANCED_BETA {beta}: {listed}. At α = 1 a class's negatives weigh 0 in the focal loss "
            "(1 − α), at α near 0 its positives do; a smaller BETA (or CLASS_ALPHA set by hand) keeps them in"
        )
