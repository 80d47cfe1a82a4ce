"""Checks of training data, run once before training so a bad annotation fails fast.

detectron2's ``DatasetMapper`` silently drops boxes it cannot use: NaN or infinite
coordinates and boxes with x2 < x1 fail its non-empty test and vanish without a word,
and a class id ≥ NUM_CLASSES only fails deep inside the loss (or, on a GPU, as a device
assert) hours later. Here they are errors that name the image, the annotation and the
value. Boxes of zero width or height are dropped by the mapper, as usual; their number is
logged.

Image files are checked too (:func:`drop_unusable_images`, ``DATALOADER.CHECK_IMAGES``): a
truncated JPEG decodes without an error in OpenCV and PIL's lazy open (the missing part
becomes grey), and an image whose aspect ratio the resize cannot honour (1 x 2000 px) raises
deep inside detectron2's ``ResizeTransform``. Such images are left out, with a warning that
names each one and its reason, so one bad file never costs a whole run.
"""
import logging
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode
from detectron2.utils import comm
from PIL import Image

from retina_focal.modeling.input_checks import image_name

__all__ = [
    "IMAGE_CHECKS",
    "check_dataset_dicts",
    "check_num_classes",
    "check_same_classes",
    "check_test_sets",
    "checked_dataset_dicts",
    "drop_unusable_images",
    "UnusableImageError",
    "image_file_problem",
    "read_usable_image",
    "resize_problem",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


def check_num_classes(num_classes: int, dataset_names: Sequence[str]) -> None:
    """Raise if a dataset's ``thing_classes`` metadata disagrees with NUM_CLASSES."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.RETINANET.NUM_CLASSES={num_classes} but dataset {name!r} has "
                f"{len(classes)} classes (metadata thing_classes); set MODEL.RETINANET.NUM_CLASSES {len(classes)}"
            )


def check_same_classes(train_names: Sequence[str], name: str) -> None:
    """Raise if dataset ``name`` lists other classes (or another order) than the training
    sets: the model's class k would be scored against another class."""
    ours = MetadataCatalog.get(name).get("thing_classes", None)
    for train in train_names:
        theirs = MetadataCatalog.get(train).get("thing_classes", None)
        if ours is not None and theirs is not None and list(ours) != list(theirs):
            raise ValueError(
                f"dataset {name!r} has the classes {list(ours)}, the training set {train!r} has {list(theirs)}; "
                "the same names in the same order are needed (a CSV classes file or a VOC classes.txt fixes the order)"
            )


def check_test_sets(num_classes: int, train_names: Sequence[str], test_names: Sequence[str]) -> None:
    """Raise if a test set's classes disagree with NUM_CLASSES or with the training sets'
    (:func:`check_num_classes`, :func:`check_same_classes`): run when training starts, so a
    wrong test set stops the run before the first iteration, not at the first evaluation."""
    check_num_classes(num_classes, test_names)
    for name in test_names:
        check_same_classes(train_names, name)


def _xyxy(ann: Dict) -> List[float]:
    return BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)


def _annotation_problem(ann: Dict, num_classes: int) -> Optional[str]:
    """What is wrong with one (non-crowd) annotation, or None."""
    category = ann.get("category_id")
    if not isinstance(category, numbers.Integral) or not 0 <= category < num_classes:
        return f"category_id {category!r} is not in [0, {num_classes})"
    bbox = ann.get("bbox")
    if bbox is None or len(bbox) != 4:
        return f"bbox {bbox!r} does not have 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)} is not finite"
    x1, y1, x2, y2 = _xyxy(ann)
    if x2 < x1 or y2 < y1:
        return f"bbox {list(bbox)} ({BoxMode(ann.get('bbox_mode', 0)).name}) has x2 < x1 or y2 < y1"
    return None


def _is_zero_area(ann: Dict) -> bool:
    x1, y1, x2, y2 = _xyxy(ann)
    return x2 == x1 or y2 == y1


def check_dataset_dicts(dicts: List[Dict], num_classes: int, dataset_names: Sequence[str] = ()) -> None:
    """Raise a ValueError listing invalid annotations; log how many boxes have zero area.

    Args:
        dicts (list[dict]): detectron2 dataset dicts; crowd annotations are skipped (the
            mapper ignores them for training).
        num_classes (int): K, valid class ids are 0..K-1.
        dataset_names (list[str]): only for the messages.
    """
    problems: List[str] = []
    zero_area = 0
    for record in dicts:
        for i, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            problem = _annotation_problem(ann, num_classes)
            if problem is not None:
                problems.append(f"{image_name(record)} annotation {i}: {problem}")
            elif _is_zero_area(ann):
                zero_area += 1
    where = f"dataset(s) {list(dataset_names)}" if dataset_names else "the training data"
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{len(problems)} invalid annotation(s) in {where}:\n  {listed}{more}")
    if zero_area:
        logger.warning(f"{zero_area} box(es) of zero width or height in {where} will be dropped")


# DATALOADER.CHECK_IMAGES: "quick" reads each file's header and its last bytes (a truncated
# JPEG or PNG has lost its end marker), "full" decodes every pixel, "none" skips the check.
IMAGE_CHECKS = ("quick", "full", "none")
_TAIL_BYTES = 4096  # where the end marker must be (some writers append a few bytes after it)
_END_MARKERS = {"JPEG": (b"\xff\xd9", "JPEG end-of-image marker"), "PNG": (b"IEND", "PNG IEND chunk")}


def _missing_end_marker(path: str, image_format: Optional[str]) -> Optional[str]:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        tail = f.read()
    return None if marker[0] in tail else f"truncated: no {marker[1]} at the end of the file"


def image_file_problem(path: str, mode: str = "quick") -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """Why the image at ``path`` cannot be used, and its (height, width) when known.

    Args:
        path (str): an image file.
        mode (str): "quick" (header and end marker) or "full" (decode every pixel, as the
            data loader will; detectron2's ``read_image``, EXIF orientation applied).

    Returns:
        (str or None, (int, int) or None): the problem (None: usable) and the size.
    """
    try:
        if mode == "full":
            return None, read_usable_image(path).shape[:2]
        with Image.open(path) as image:
            problem = bit_depth_problem(image)
            if problem:
                return problem, None
            height, width = oriented_size(image)
            image_format = image.format
    except FileNotFoundError:
        return "no such file", None
    except Exception as e:  # PIL: UnidentifiedImageError, ...; read_usable_image: ValueError
        return _decode_problem(e), None
    return _missing_end_marker(path, image_format), (height, width)


def _decode_problem(error: Exception) -> str:
    return str(error) if isinstance(error, UnusableImageError) else f"cannot be decoded ({type(error).__name__}: {error})"


class UnusableImageError(ValueError):
    """An image file that exists but cannot be decoded to its last pixel, or not as 8-bit RGB."""


# PIL modes of one channel with more than 8 bits (16-bit PNG/TIFF, 32-bit int and float TIFF).
# detectron2's read_image converts them to 8-bit RGB by clipping every value above 255, so a
# 16-bit photograph becomes a white image.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 274  # the EXIF tag; values 5-8 turn the image by 90 degrees
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def bit_depth_problem(image: Image.Image) -> Optional[str]:
    """Why ``image`` (opened, not decoded) cannot be read as 8-bit RGB, or None."""
    if image.mode not in _HIGH_BIT_DEPTH_MODES:
        return None
    return (
        f"a high-bit-depth image (PIL mode {image.mode}): read as 8-bit RGB every value above 255 would be "
        "clipped (a white image); convert it to 8 bits per channel first (e.g. scaled by 255 / its maximum)"
    )


def oriented_size(image: Image.Image) -> Tuple[int, int]:
    """(height, width) of ``image`` as detectron2's ``read_image`` returns it: after its EXIF
    orientation (a photo taken upright on its side is stored W x H and read H x W)."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block: read_image ignores it too
        orientation = None
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def read_usable_image(path: str) -> np.ndarray:
    """detectron2's ``read_image(path, "BGR")`` (PIL, EXIF orientation applied), decoded to
    the last pixel: a truncated file raises :class:`UnusableImageError` (OpenCV would fill
    the missing part with grey and only print "Premature end of JPEG file").

    Returns:
        (H, W, 3) uint8 BGR.

    Raises:
        FileNotFoundError; UnusableImageError naming the decoder's complaint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with Image.open(path) as image:
            problem = bit_depth_problem(image)
    except Exception as e:  # PIL: UnidentifiedImageError, ...
        raise UnusableImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e
    if problem:
        raise UnusableImageError(problem)
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL: OSError "image file is truncated", UnidentifiedImageError, ...
        raise UnusableImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e


def resize_problem(height: int, width: int, short_edge: int, max_size: int, keys: str) -> Optional[str]:
    """Why an image of ``height`` x ``width`` cannot go through detectron2's
    ``ResizeShortestEdge(short_edge, max_size)`` (a side would become 0 px), or None."""
    if height < 1 or width < 1:
        return f"{width}x{height} px has no pixels"
    new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, short_edge, max_size)
    if min(new_h, new_w) >= 1:
        return None
    return (
        f"{width}x{height} px: resized to a short side of {short_edge} px with the long side at most {max_size} px "
        f"({keys}) it would be {new_w}x{new_h} px; the aspect ratio is too extreme"
    )


def _record_problem(record: Dict, mode: str, short_edge: int, max_size: int, keys: str) -> Optional[str]:
    problem, size = image_file_problem(record["file_name"], mode)
    recorded = (record["height"], record["width"]) if "height" in record and "width" in record else None
    if problem is None and size is not None and recorded is not None and tuple(size) != recorded:
        return (
            f"its annotations say {recorded[1]}x{recorded[0]} px, the file is {size[1]}x{size[0]} px (EXIF orientation "
            "applied); detectron2 would stop with a SizeMismatchError when it reaches it: fix the size in the annotations"
        )
    if problem is None and size is None:
        size = recorded
    if problem is None and size is not None:
        problem = resize_problem(*size, short_edge, max_size, keys)
    return problem


def image_check_args(cfg, is_train: bool) -> Dict:
    """The keyword arguments of :func:`drop_unusable_images` for the training
    (``INPUT.MIN_SIZE_TRAIN``, smallest choice) or the test resize of ``cfg``."""
    if is_train:
        sizes = (min(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, "INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN")
    else:
        sizes = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST")
    return dict(zip(("mode", "short_edge", "max_size", "keys"), (cfg.DATALOADER.CHECK_IMAGES, *sizes)))


def drop_unusable_images(
    dicts: List[Dict], dataset_names: Sequence[str], mode: str, short_edge: int, max_size: int, keys: str
) -> List[Dict]:
    """``dicts`` without the records whose image cannot be used (:func:`image_file_problem`,
    :func:`resize_problem`); a warning names each dropped file (the first 5) and the count.
    With several processes each checks a share of the files and all get the same answer.

    Args:
        dicts (list[dict]): detectron2 dataset dicts with "file_name".
        dataset_names (list[str]): for the message.
        mode (str): one of :data:`IMAGE_CHECKS`.
        short_edge, max_size (int): the smallest short side and the long-side cap of the
            resize the images go through.
        keys (str): the config keys of that resize, for the message.
    """
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"DATALOADER.CHECK_IMAGES must be one of {list(IMAGE_CHECKS)}, got {mode!r}")
    if mode == "none" or not dicts:
        return dicts
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = [(i, _record_problem(dicts[i], mode, short_edge, max_size, keys)) for i in range(rank, len(dicts), world)]
    found = [(i, p) for i, p in mine if p is not None]
    problems = dict(sum(comm.all_gather(found), []) if world > 1 else found)
    if not problems:
        return dicts
    listed = "\n  ".join(f"{dicts[i]['file_name']}: {p}" for i, p in sorted(problems.items())[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    logger.warning(
        f"Left out {len(problems)} of the {len(dicts)} images of {list(dataset_names)} that cannot be used:\n  "
        f"{listed}{more}\n(DATALOADER.CHECK_IMAGES {mode!r}; fix or remove these files)"
    )
    return [record for i, record in enumerate(dicts) if i not in problems]


def checked_dataset_dicts(
    names: Union[str, Sequence[str]],
    num_classes: int,
    *,
    filter_empty: bool,
    mode: str = "quick",
    short_edge: int,
    max_size: int,
    keys: str = "INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN",
) -> List[Dict]:
    """The training records of the datasets ``names`` after every check before training:
    the classes (:func:`check_num_classes`), the annotations (:func:`check_dataset_dicts`) and
    the images (:func:`drop_unusable_images` with ``mode``, ``short_edge``, ``max_size``,
    ``keys``). Also usable in a LazyConfig (``L(checked_dataset_dicts)(names=...)``)."""
    names = [names] if isinstance(names, str) else list(names)
    dicts = get_detection_dataset_dicts(names, filter_empty=filter_empty)
    check_num_classes(num_classes, names)
    check_dataset_dicts(dicts, num_classes, names)
    return drop_unusable_images(dicts, names, mode, short_edge, max_size, keys)
