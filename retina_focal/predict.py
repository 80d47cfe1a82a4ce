"""Run a trained RetinaFocal on images, folders or videos: drawings and COCO-format results.

    python -m retina_focal.predict --config-file C.yaml --input a.jpg photos/ clip.mp4 \\
        --output out/ [--confidence 0.3] [--json results.json] [--batch-size 4] \\
        MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

(``retina-focal-predict`` is the same command once the package is installed.) Folders are
searched recursively for :data:`IMAGE_EXTENSIONS`; files with :data:`VIDEO_EXTENSIONS` are
read frame by frame with OpenCV. Each image is drawn with detectron2's ``Visualizer`` into
``--output``, at its path relative to the input folder (for several inputs, to the deepest
folder that holds them all, so ``a/x.png`` and ``b/x.png`` keep a drawing each), each video
into ``--output/<relative path>.avi`` (MJPG). An ``--output`` that is an input folder or lies
inside one, or any output that would overwrite an input or another output, stops the run
before anything is written (exit status 2). Every detection scoring at least ``--confidence`` (default:
the per-class thresholds of a ``class_thresholds.json`` beside ``MODEL.WEIGHTS``, which
``tools/tune_thresholds.py`` writes, else 0.3) is
written to the results JSON (default ``--output/results.json``): a COCO results list
(``image_id``, ``category_id``, ``bbox`` XYWH in pixels, ``score``) plus ``file_name`` and,
for video frames, ``frame``. Inference options are config keys given as ``KEY VALUE``:
``MODEL.RETINANET.SCORE_THRESH_TEST``, ``MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH``,
``MODEL.RETINA_FOCAL.CLASS_AGNOSTIC_NMS``, ``MODEL.DEVICE`` ...

``--batch-size N`` runs N images per forward pass; images of different sizes in one batch
are padded to a common size (detectron2's ``ImageList``), which changes the scores slightly
from those of one image at a time.

Every image is decoded to its last pixel when it is read (detectron2's ``read_image``: a
truncated JPEG is an error, not a half-grey picture) and must survive the test-time resize
(a 1 x 2000 px image would become 0 px high). A missing path, an image or video that cannot be
used, or a batch on which the model raises, is reported and skipped; the others are processed,
``results.json`` is written even if the run is interrupted, and a summary lists what was
skipped (exit status 1). Arguments that fit nothing stop the run before it starts (exit status
2): weights that do not fit the config (every model tensor must be in the checkpoint; e.g.
another ``NUM_CLASSES``), an empty ``MODEL.WEIGHTS``, ``--confidence`` outside [0, 1], an
output folder that cannot be written, or inputs that hold no image or video at all.
"""
import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from retina_focal.config.load import load_config
from retina_focal.data.checks import (
    UnusableImageError,
    read_usable_image,
    resize_problem,
)
from retina_focal.diagnostics.thresholds import DEFAULT_THRESHOLD, THRESHOLDS_FILE, read_thresholds
from retina_focal.export.backends import (
    BackendBuildError,
    add_backend_argument,
    backend_opts,
    check_backend_settings,
)
from retina_focal.export.predictor import BatchPredictor, model_input  # noqa: F401  (model_input: the old path)

# BatchPredictor, load_inference_model and model_input live in retina_focal/export/predictor.py;
# retina_focal.predict.model_input and .BatchPredictor stay importable from here for one release.
__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "find_inputs", "overwrite_problem", "predict", "main"]

DEFAULT_CONFIDENCE = DEFAULT_THRESHOLD
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg")
_VIDEO_CODEC = "MJPG"  # written as .avi: OpenCV's pip wheels always have it


@dataclass
class Frame:
    """One image to predict: ``write`` receives its drawing (BGR)."""

    file_name: str
    image: np.ndarray  # (H, W, 3) uint8 BGR
    write: Callable[[np.ndarray], None]
    frame: Optional[int] = None  # index in its video


@dataclass
class Inputs:
    """What :func:`find_inputs` found: (path, output path) pairs, and skipped paths."""

    images: List[Tuple[str, str]] = field(default_factory=list)
    videos: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _kind(path: str) -> Optional[str]:
    """"image", "video" or None, by the file extension."""
    ext = os.path.splitext(path)[1].lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _skip(skipped: List[Tuple[str, str]], path: str, reason: str) -> None:
    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
    skipped.append((path, reason))


def _folder_images(folder: str) -> Iterator[str]:
    """The images below ``folder``, recursively, in sorted order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if _kind(path) == "image":
                yield path


def _input_root(paths: Sequence[str]) -> str:
    """The folder that drawing paths are relative to: the one input folder, or the folder of
    the one input file, or the deepest folder that holds every input."""
    folders = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths if os.path.exists(p)]
    return os.path.commonpath(folders) if folders else "."


def find_inputs(paths: Iterable[str], output_dir: str) -> Inputs:
    """Expand files and folders into images and videos, each with the path its drawing goes
    to: the input's path relative to :func:`_input_root`, below ``output_dir`` (so ``a/x.png``
    and ``b/x.png`` get a drawing each; a video's drawing is ``<relative stem>.avi``). Missing
    paths, files of other types and folders without images are recorded as skipped."""
    paths = list(paths)
    root = _input_root(paths)

    def drawing(path: str, suffix: Optional[str] = None) -> str:
        relative = os.path.relpath(os.path.abspath(path), root)
        return os.path.join(output_dir, os.path.splitext(relative)[0] + suffix if suffix else relative)

    found = Inputs()
    for path in paths:
        kind = _kind(path)
        if os.path.isdir(path):
            images = [(p, drawing(p)) for p in _folder_images(path)]
            if not images:
                _skip(found.skipped, path, f"folder holds no image ({' '.join(IMAGE_EXTENSIONS)}), recursively")
            found.images.extend(images)
        elif not os.path.isfile(path):
            _skip(found.skipped, path, "no such file or folder")
        elif kind is None:
            types = f"not an image ({' '.join(IMAGE_EXTENSIONS)}) or video ({' '.join(VIDEO_EXTENSIONS)})"
            _skip(found.skipped, path, types)
        elif kind == "image":
            found.images.append((path, drawing(path)))
        else:
            found.videos.append((path, drawing(path, ".avi")))
    return found


def overwrite_problem(paths: Sequence[str], inputs: Inputs, output_dir: str, json_file: str) -> Optional[str]:
    """Why writing the drawings and results would destroy or mix up inputs, or None: an output
    that is an input file, an ``--output`` folder that is an input folder or inside one (a
    later run on that folder would predict on the drawings), or two inputs with one drawing."""
    output = os.path.realpath(output_dir)
    for folder in (os.path.realpath(p) for p in paths if os.path.isdir(p)):
        if output == folder or output.startswith(folder + os.sep):
            return (f"--output {output_dir} is {'the' if output == folder else 'inside the'} input folder {folder}: its "
                    "drawings would overwrite or join the inputs; choose an --output folder outside every --input folder")
    sources = {os.path.realpath(path) for path, _ in inputs.images + inputs.videos}
    outputs: Dict[str, str] = {}
    for path, out_path in inputs.images + inputs.videos + [("results", json_file)]:
        real = os.path.realpath(out_path)
        if real in sources:
            return f"the output {out_path} of {path} is an input file: it would be overwritten"
        if real in outputs:
            return f"{outputs[real]} and {path} would be drawn to the same file {out_path}"
        outputs[real] = path
    return None


def _write_image(out_path: str) -> Callable[[np.ndarray], None]:
    def write(drawing: np.ndarray) -> None:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        cv2.imwrite(out_path, drawing)

    return write


def _image_frames(images: List[Tuple[str, str]], skipped: List[Tuple[str, str]]) -> Iterator[Frame]:
    for path, out_path in images:
        try:
            image = read_usable_image(path)  # decoded to the last pixel
        except (FileNotFoundError, UnusableImageError) as e:
            _skip(skipped, path, str(e) if isinstance(e, UnusableImageError) else "no such file")
            continue
        yield Frame(path, image, _write_image(out_path))


def _resizable(cfg, frames: Iterable[Frame], skipped: List[Tuple[str, str]]) -> Iterator[Frame]:
    """The frames that survive the test-time resize (:func:`model_input`); the others skipped."""
    for frame in frames:
        height, width = frame.image.shape[:2]
        problem = resize_problem(
            height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST"
        )
        if problem is None:
            yield frame
        else:
            _skip(skipped, _frame_name(frame), problem)


def _frame_name(frame: Frame) -> str:
    return frame.file_name if frame.frame is None else f"{frame.file_name} (frame {frame.frame})"


class _VideoWriter:
    """An MJPG .avi opened at the first frame (whose size it takes)."""

    def __init__(self, out_path: str, fps: float):
        self.out_path, self.fps, self._writer = out_path, fps, None

    def write(self, drawing: np.ndarray) -> None:
        if self._writer is None:
            os.makedirs(os.path.dirname(self.out_path) or ".", exist_ok=True)
            size = (drawing.shape[1], drawing.shape[0])
            self._writer = cv2.VideoWriter(self.out_path, cv2.VideoWriter_fourcc(*_VIDEO_CODEC), self.fps, size)
        self._writer.write(drawing)

    @property
    def is_empty(self) -> bool:
        return self._writer is None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def _video_frames(capture: cv2.VideoCapture, path: str, writer: _VideoWriter) -> Iterator[Frame]:
    index = 0
    while True:
        ok, image = capture.read()
        if not ok:
            return
        yield Frame(path, image, writer.write, frame=index)
        index += 1


def _batches(frames: Iterable[Frame], batch_size: int) -> Iterator[List[Frame]]:
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _frame_count(path: str) -> int:
    capture = cv2.VideoCapture(path)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    capture.release()
    return max(count, 0)


def _metadata(cfg):
    """The metadata (class names, COCO ids) of the first training set, else of the first test
    set, registered here whose classes fit the model; else none (classes drawn by number)."""
    for name in list(cfg.DATASETS.TRAIN[:1]) + list(cfg.DATASETS.TEST[:1]):
        if name in DatasetCatalog.list():
            metadata = MetadataCatalog.get(name)
            if len(metadata.get("thing_classes", [])) == cfg.MODEL.RETINANET.NUM_CLASSES:
                return metadata
    return MetadataCatalog.get("__retina_focal_predict_no_dataset__")


class _Results:
    """COCO-format results of all frames; category ids mapped back to the dataset's ids
    (e.g. COCO's 1..90) when the metadata has them, as COCOEvaluator does."""

    def __init__(self, metadata, items: List[Dict]):
        mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
        self._dataset_id = {v: k for k, v in mapping.items()} if mapping else None
        self.items = items
        self.num_images = 0

    def add(self, frame: Frame, instances: Instances) -> None:
        self.num_images += 1
        for result in instances_to_coco_json(instances, self.num_images):
            if self._dataset_id:
                result["category_id"] = self._dataset_id[result["category_id"]]
            result["file_name"] = frame.file_name
            if frame.frame is not None:
                result["frame"] = frame.frame
            self.items.append(result)


def _predict_batch(predictor: BatchPredictor, batch: List[Frame], skipped: List[Tuple[str, str]]):
    """[(frame, instances)] of ``batch``; if the model raises, the frames one by one, and a
    frame on which it still raises is skipped with the error."""
    try:
        return list(zip(batch, predictor([f.image for f in batch])))
    except BackendBuildError:  # no image can be predicted: the run stops (main: exit 2)
        raise
    except Exception as e:  # e.g. out of memory on one huge image: the run goes on
        if len(batch) == 1:
            _skip(skipped, _frame_name(batch[0]), f"the model failed on it ({type(e).__name__}: {e})")
            return []
        return [pair for frame in batch for pair in _predict_batch(predictor, [frame], skipped)]


def _thresholds_of(instances: Instances, confidence: Union[float, Sequence[float]]):
    """The confidence threshold of each detection: the float, or its class's."""
    if isinstance(confidence, (int, float)):
        return confidence
    return torch.as_tensor(confidence, dtype=instances.scores.dtype)[instances.pred_classes]


def predict(
    predictor: BatchPredictor,
    metadata,
    inputs: Inputs,
    *,
    confidence: Union[float, Sequence[float]] = 0.3,
    batch_size: int = 1,
    results: Optional[List[Dict]] = None,
) -> List[Dict]:
    """Predict, draw and collect the results of every image and video frame in ``inputs``.

    Images and frames that cannot be used (undecodable, too elongated for the resize, the
    model raises on them) and videos without a readable frame are added to ``inputs.skipped``.

    Args:
        confidence (float or K floats): keep detections scoring at least this (per class).
        results (list or None): the list to append the results to, as they come (so the
            caller keeps those of an interrupted run); a new one if None.

    Returns:
        list[dict]: ``results``, COCO-format results with score >= ``confidence``.
    """
    collected = _Results(metadata, results if results is not None else [])
    total = len(inputs.images) + sum(_frame_count(path) for path, _ in inputs.videos)
    with tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True) as progress:

        def run(frames: Iterable[Frame]) -> None:
            for batch in _batches(_resizable(predictor.cfg, frames, inputs.skipped), batch_size):
                for frame, instances in _predict_batch(predictor, batch, inputs.skipped):
                    instances = instances[instances.scores >= _thresholds_of(instances, confidence)]
                    rgb = frame.image[:, :, ::-1]
                    drawing = Visualizer(rgb, metadata).draw_instance_predictions(instances).get_image()
                    frame.write(np.ascontiguousarray(drawing[:, :, ::-1]))
                    collected.add(frame, instances)
                progress.update(len(batch))

        run(_image_frames(inputs.images, inputs.skipped))
        for path, out_path in inputs.videos:
            capture = cv2.VideoCapture(path)
            writer = _VideoWriter(out_path, capture.get(cv2.CAP_PROP_FPS) or 25.0)
            try:
                run(_video_frames(capture, path, writer))
            finally:
                writer.close()
                capture.release()
            if writer.is_empty:  # not opened, or no frame decoded
                _skip(inputs.skipped, path, "no frame can be read from this video")
    return collected.items


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retina-focal-predict", description="Run a trained RetinaFocal on images, folders or videos."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, nargs="+", help="image files, folders (recursive) or video files")
    parser.add_argument("--output", required=True, metavar="DIR", help="drawings and (by default) results.json")
    parser.add_argument(
        "--confidence",
        type=float,
        help=f"draw and write detections scoring at least this (default: the per-class thresholds of a "
        f"{THRESHOLDS_FILE} beside MODEL.WEIGHTS, from tools/tune_thresholds.py, else {DEFAULT_CONFIDENCE})",
    )
    parser.add_argument("--json", metavar="FILE", help="results file (default: OUTPUT/results.json)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    add_backend_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, e.g. MODEL.WEIGHTS w.pth")
    return parser


def _argument_problem(args) -> Optional[str]:
    """What is wrong with the arguments before anything runs, or None."""
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.confidence is not None and not 0.0 <= args.confidence <= 1.0:
        return f"--confidence must be a score in [0, 1], got {args.confidence}"
    for folder in (args.output, os.path.dirname(os.path.abspath(args.json)) if args.json else None):
        problem = folder and _unwritable(folder)
        if problem:
            return problem
    return None


def _unwritable(folder: str) -> Optional[str]:
    """Why nothing can be written into ``folder`` (created if missing), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write into {folder}: {e.strerror or e}"
    return None


def _write_results(results: List[Dict], json_file: str, args, confidence) -> None:
    with open(json_file, "w") as f:
        json.dump(results, f)
    kept = f"score >= {confidence}" if isinstance(confidence, float) else "per-class thresholds"
    print(f"{len(results)} detections ({kept}) written to {json_file}; drawings in {args.output}")


def _confidence(args, cfg, metadata) -> Union[float, List[float]]:
    """``--confidence``, or the per-class thresholds tuned for these weights, or the default."""
    if args.confidence is not None:
        return args.confidence
    tuned = os.path.join(os.path.dirname(os.path.abspath(cfg.MODEL.WEIGHTS)), THRESHOLDS_FILE)
    if not os.path.isfile(tuned):
        return DEFAULT_CONFIDENCE
    thresholds = read_thresholds(tuned, metadata.get("thing_classes", None) or [str(k) for k in range(cfg.MODEL.RETINANET.NUM_CLASSES)])
    print(f"per-class thresholds from {tuned}: {thresholds}")
    return thresholds


def _print_skipped(skipped: List[Tuple[str, str]]) -> None:
    print(f"Skipped {len(skipped)} input(s):", file=sys.stderr)
    for path, reason in skipped:
        print(f"  {path}: {reason}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; returns 0, 1 (some inputs skipped) or 2 (arguments, config, weights or
    inputs unusable: nothing was predicted)."""
    args = _parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    inputs = find_inputs(args.input, args.output)
    if not inputs.images and not inputs.videos:
        print("error: no image or video to predict in --input", file=sys.stderr)
        _print_skipped(inputs.skipped)
        return 2
    json_file = args.json or os.path.join(args.output, "results.json")
    problem = overwrite_problem(args.input, inputs, args.output, json_file)
    if problem:
        print(f"error: {problem}; no drawing or result was written", file=sys.stderr)
        return 2
    cfg = load_config(args.config_file, backend_opts(args) + args.opts, for_inference=True)
    try:
        check_backend_settings(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        predictor = BatchPredictor(cfg)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: cannot run {args.config_file} with these weights: {e}", file=sys.stderr)
        return 2
    metadata = _metadata(cfg)
    try:
        confidence = _confidence(args, cfg, metadata)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results: List[Dict] = []
    try:
        predict(predictor, metadata, inputs, confidence=confidence, batch_size=args.batch_size, results=results)
    except BackendBuildError as e:  # at the first image: nothing was predicted
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # also when interrupted: what was predicted is kept
        _write_results(results, json_file, args, confidence)
        if inputs.skipped:
            _print_skipped(inputs.skipped)
    return 1 if inputs.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
