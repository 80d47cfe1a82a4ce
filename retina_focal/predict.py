"""Run a trained RetinaFocal on images, folders or videos: drawings and COCO-format results.

    python -m retina_focal.predict --config-file C.yaml --input a.jpg photos/ clip.mp4 \\
        --output out/ [--confidence 0.3] [--json results.json] [--batch-size 4] \\
        MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

(``retina-focal-predict`` is the same command once the package is installed.) Folders are
searched recursively for :data:`IMAGE_EXTENSIONS`; files with :data:`VIDEO_EXTENSIONS` are
read frame by frame with OpenCV. Each image is drawn with detectron2's ``Visualizer`` into
``--output`` (same relative path below a folder input), each video into
``--output/<name>.avi`` (MJPG), and every detection scoring at least ``--confidence`` is
written to the results JSON (default ``--output/results.json``): a COCO results list
(``image_id``, ``category_id``, ``bbox`` XYWH in pixels, ``score``) plus ``file_name`` and,
for video frames, ``frame``. Inference options are config keys given as ``KEY VALUE``:
``MODEL.RETINANET.SCORE_THRESH_TEST``, ``MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH``,
``MODEL.RETINA_FOCAL.CLASS_AGNOSTIC_NMS``, ``MODEL.DEVICE`` ...

``--batch-size N`` runs N images per forward pass; images of different sizes in one batch
are padded to a common size (detectron2's ``ImageList``), which changes the scores slightly
from those of one image at a time.

A missing path, an unreadable image or video is reported and skipped; the others are
processed and a summary lists what was skipped (exit status 1). Weights that do not fit the
config (e.g. another ``NUM_CLASSES``) stop the run with the checkpointer's message (exit
status 2).
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from .checkpoint import RetinaFocalCheckpointer
from .engine import load_config

__all__ = [
    "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "BatchPredictor", "load_model", "model_input", "find_inputs", "predict", "main"
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg")
_VIDEO_CODEC = "MJPG"  # written as .avi: OpenCV's pip wheels always have it


def load_model(cfg) -> torch.nn.Module:
    """The model of ``cfg`` in eval mode with ``cfg.MODEL.WEIGHTS`` loaded.

    Raises:
        FileNotFoundError: MODEL.WEIGHTS is empty or names no file.
        ValueError: the weights do not fit the config (RetinaFocalCheckpointer's message).
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights or ("://" not in weights and not os.path.isfile(weights)):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights!r}: no such file; pass MODEL.WEIGHTS path/to/model_final.pth")
    model = build_model(cfg).eval()
    RetinaFocalCheckpointer(model).load(weights)
    return model


def model_input(cfg, image_bgr: np.ndarray) -> torch.Tensor:
    """What detectron2's ``DefaultPredictor`` feeds the model: ``INPUT.FORMAT`` channel order,
    short side resized to ``INPUT.MIN_SIZE_TEST`` (long side at most ``INPUT.MAX_SIZE_TEST``).

    Args:
        image_bgr: (H0, W0, 3) uint8 BGR (``cv2.imread``).

    Returns:
        (3, H, W) float32, values 0-255.
    """
    image = image_bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image_bgr
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


class BatchPredictor:
    """detectron2's ``DefaultPredictor`` for a batch: a list of BGR images in, one
    ``Instances`` per image out, in original-image pixels."""

    def __init__(self, cfg):
        """Build the model of ``cfg`` and load ``cfg.MODEL.WEIGHTS`` (see :func:`load_model`)."""
        self.cfg = cfg
        self.model = load_model(cfg)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: each (H, W, 3) uint8 BGR, sizes may differ.
        """
        inputs = [
            {"image": model_input(self.cfg, image), "height": image.shape[0], "width": image.shape[1]} for image in images
        ]
        return [out["instances"].to("cpu") for out in self.model(inputs)]


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


def _folder_images(folder: str, output_dir: str) -> Iterator[Tuple[str, str]]:
    """(image, drawing) paths below ``folder``, recursively, in sorted order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if _kind(path) == "image":
                yield path, os.path.join(output_dir, os.path.relpath(path, folder))


def find_inputs(paths: Iterable[str], output_dir: str) -> Inputs:
    """Expand files and folders into images and videos, each with the path its drawing goes
    to; record missing paths and files of other types as skipped."""
    found = Inputs()
    for path in paths:
        kind = _kind(path)
        if os.path.isdir(path):
            found.images.extend(_folder_images(path, output_dir))
        elif not os.path.isfile(path):
            _skip(found.skipped, path, "no such file or folder")
        elif kind is None:
            types = f"not an image ({' '.join(IMAGE_EXTENSIONS)}) or video ({' '.join(VIDEO_EXTENSIONS)})"
            _skip(found.skipped, path, types)
        elif kind == "image":
            found.images.append((path, os.path.join(output_dir, os.path.basename(path))))
        else:
            stem = os.path.splitext(os.path.basename(path))[0]
            found.videos.append((path, os.path.join(output_dir, stem + ".avi")))
    return found


def _write_image(out_path: str) -> Callable[[np.ndarray], None]:
    def write(drawing: np.ndarray) -> None:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        cv2.imwrite(out_path, drawing)

    return write


def _image_frames(images: List[Tuple[str, str]], skipped: List[Tuple[str, str]]) -> Iterator[Frame]:
    for path, out_path in images:
        image = cv2.imread(path, cv2.IMREAD_COLOR)  # None when the file cannot be decoded
        if image is None:
            _skip(skipped, path, "cannot be read as an image")
            continue
        yield Frame(path, image, _write_image(out_path))


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
    """The first test set's metadata when its classes fit the model (names, COCO ids); else none."""
    if cfg.DATASETS.TEST:
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        if len(metadata.get("thing_classes", [])) == cfg.MODEL.RETINANET.NUM_CLASSES:
            return metadata
    return MetadataCatalog.get("__retina_focal_predict_no_dataset__")


class _Results:
    """COCO-format results of all frames; category ids mapped back to the dataset's ids
    (e.g. COCO's 1..90) when the metadata has them, as COCOEvaluator does."""

    def __init__(self, metadata):
        mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
        self._dataset_id = {v: k for k, v in mapping.items()} if mapping else None
        self.items: List[Dict] = []
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


def predict(
    predictor: BatchPredictor,
    metadata,
    inputs: Inputs,
    *,
    confidence: float = 0.3,
    batch_size: int = 1,
) -> List[Dict]:
    """Predict, draw and collect the results of every image and video frame in ``inputs``.

    Unreadable images and videos are added to ``inputs.skipped``.

    Returns:
        list[dict]: COCO-format results with score >= ``confidence``.
    """
    results = _Results(metadata)
    total = len(inputs.images) + sum(_frame_count(path) for path, _ in inputs.videos)
    with tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True) as progress:

        def run(frames: Iterable[Frame]) -> None:
            for batch in _batches(frames, batch_size):
                for frame, instances in zip(batch, predictor([f.image for f in batch])):
                    instances = instances[instances.scores >= confidence]
                    rgb = frame.image[:, :, ::-1]
                    drawing = Visualizer(rgb, metadata).draw_instance_predictions(instances).get_image()
                    frame.write(np.ascontiguousarray(drawing[:, :, ::-1]))
                    results.add(frame, instances)
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
    return results.items


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retina-focal-predict", description="Run a trained RetinaFocal on images, folders or videos."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, nargs="+", help="image files, folders (recursive) or video files")
    parser.add_argument("--output", required=True, metavar="DIR", help="drawings and (by default) results.json")
    parser.add_argument("--confidence", type=float, default=0.3, help="draw and write detections scoring at least this")
    parser.add_argument("--json", metavar="FILE", help="results file (default: OUTPUT/results.json)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, e.g. MODEL.WEIGHTS w.pth")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; returns 0, 1 (some inputs skipped) or 2 (config or weights unusable)."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    cfg = load_config(args.config_file, args.opts)
    try:
        predictor = BatchPredictor(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot run {args.config_file} with these weights: {e}", file=sys.stderr)
        return 2
    inputs = find_inputs(args.input, args.output)
    results = predict(predictor, _metadata(cfg), inputs, confidence=args.confidence, batch_size=args.batch_size)
    json_file = args.json or os.path.join(args.output, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_file)), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(results, f)
    print(f"{len(results)} detections (score >= {args.confidence}) written to {json_file}; drawings in {args.output}")
    if inputs.skipped:
        print(f"Skipped {len(inputs.skipped)} input(s):", file=sys.stderr)
        for path, reason in inputs.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
