"""RetinaFocalCOCOEvaluator: COCOEvaluator's results, a note when AP is NaN, flat memory."""
import json
import logging
import math
import os
from contextlib import contextmanager
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import load_coco_json
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances

from retina_focal.data import SHAPE_CLASSES
from retina_focal.data.shapes import ShapesSplit, generate_split
from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.evaluation import RetinaFocalCOCOEvaluator

from tests.conftest import small_cfg

PX = 64  # image side; MIN_SIZE_TEST = PX, so the mapper does not resize
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


# ---------------------------------------------------------------- helpers


def _register(name: str, dicts: List[Dict], json_file: str = None) -> str:
    """(Re)register ``dicts`` as ``name``; with ``json_file`` COCOEvaluator reads that file,
    without it COCOEvaluator converts the dicts to COCO json itself."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(SHAPE_CLASSES))
    if json_file:
        MetadataCatalog.get(name).set(json_file=json_file)
    return name


def _shapes(root, num_images: int, **spec) -> Tuple[List[Dict], str]:
    """A generated shapes split of ``num_images`` PX-pixel images: (dicts, json_file)."""
    json_file, image_root = generate_split(ShapesSplit("val", num_images=num_images, image_size=PX, **spec), str(root))
    return load_coco_json(json_file, image_root), json_file


def _instances(boxes_xyxy, classes) -> Instances:
    return Instances(
        (PX, PX),
        pred_boxes=Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)),
        scores=torch.full((len(classes),), 0.9),
        pred_classes=torch.tensor(classes, dtype=torch.int64),
    )


def _ground_truth_as_detections(record: Dict) -> Instances:
    """Perfect detections for one dataset dict: its own boxes and classes."""
    anns = record["annotations"]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    return _instances(boxes, [a["category_id"] for a in anns])


def _evaluate(evaluator, dicts: List[Dict], detections) -> Dict:
    """Feed ``detections(record) -> Instances`` for every record to ``evaluator``."""
    evaluator.reset()
    for record in dicts:
        evaluator.process([record], [{"instances": detections(record)}])
    return evaluator.evaluate()


@contextmanager
def _notes():
    """Collect what retina_focal.evaluation logs, with a handler on that logger itself
    (detectron2's setup_logger sets propagate=False on the loggers it configures, which would
    hide records from caplog's root handler)."""
    messages: List[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("retina_focal.evaluation")
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def _tiny_model_and_loader(dicts: List[Dict], *opts, batch_size: int = 1):
    """The untrained R-18 RetinaFocal of small_cfg on PX-pixel inputs, and a test loader."""
    cfg = small_cfg("INPUT.MIN_SIZE_TEST", PX, "INPUT.MAX_SIZE_TEST", PX, *opts)
    model = build_model(cfg).eval()
    loader = build_detection_test_loader(
        dicts, mapper=DatasetMapper(cfg, is_train=False), num_workers=0, batch_size=batch_size
    )
    return model, loader


def _all_nan(metrics: Dict[str, float]) -> bool:
    return all(math.isnan(v) for v in metrics.values())


# ---------------------------------------------------------------- same results as COCOEvaluator


def _saved_results(output_dir) -> list:
    """What an evaluator wrote to ``output_dir/coco_instances_results.json``."""
    with open(os.path.join(output_dir, "coco_instances_results.json")) as f:
        return json.load(f)


def test_same_results_as_coco_evaluator_and_no_note(tmp_path):
    dicts, json_file = _shapes(tmp_path, 8)
    name = _register("eval_test_with_gt", dicts, json_file)
    d2_dir, our_dir = str(tmp_path / "d2"), str(tmp_path / "ours")
    expected = _evaluate(COCOEvaluator(name, output_dir=d2_dir), dicts, _ground_truth_as_detections)
    with _notes() as notes:
        got = _evaluate(RetinaFocalCOCOEvaluator(name, output_dir=our_dir), dicts, _ground_truth_as_detections)
    np.testing.assert_equal(got, expected)  # NaN == NaN here (classes absent from 8 images)
    assert got["bbox"]["AP"] == pytest.approx(100.0)
    assert notes == []
    assert _saved_results(our_dir) == _saved_results(d2_dir) != []


# ---------------------------------------------------------------- 0 detections


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")  # detectron2's
def test_no_detections_gives_nan_and_a_note(tmp_path):
    dicts, json_file = _shapes(tmp_path, 4)
    name = _register("eval_test_no_detections", dicts, json_file)
    # untrained: every score is about the prior 0.01, far below 0.999
    model, loader = _tiny_model_and_loader(dicts, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.999)
    evaluator = RetinaFocalCOCOEvaluator(name, output_dir=str(tmp_path), score_thresh=0.999)
    with _notes() as notes:
        results = inference_on_dataset(model, loader, evaluator)
    assert list(results) == ["bbox"] and list(results["bbox"]) == METRICS and _all_nan(results["bbox"])
    assert len(notes) == 1
    for part in ("0 detections", "4 evaluated images", f"'{name}'", "SCORE_THRESH_TEST (= 0.999 here)"):
        assert part in notes[0]
    assert _saved_results(tmp_path) == []


# ---------------------------------------------------------------- 0 ground-truth annotations


@pytest.mark.parametrize("registered_as", ["coco_json", "dicts"])
def test_no_ground_truth_gives_nan_and_a_note(tmp_path, registered_as):
    """Both registrations give COCOEvaluator's answer for an empty COCO json: NaN everywhere.
    (For dicts, COCOEvaluator alone returns {}: the converted json lacks "annotations".)"""
    dicts, json_file = _shapes(tmp_path, 4, empty_fraction=1.0)
    assert not any(r["annotations"] for r in dicts)
    name = _register(f"eval_test_no_gt_{registered_as}", dicts, json_file if registered_as == "coco_json" else None)
    evaluator = RetinaFocalCOCOEvaluator(name, output_dir=str(tmp_path / "out"))
    with _notes() as notes:
        results = _evaluate(evaluator, dicts, lambda record: _instances([[4, 4, 30, 30]], [0]))
    assert list(results["bbox"]) == METRICS + [f"AP-{c}" for c in SHAPE_CLASSES]
    assert _all_nan(results["bbox"])
    assert len(notes) == 1
    for part in ("0 ground-truth annotations", "4 evaluated images", f"'{name}'", "undefined"):
        assert part in notes[0]
    assert len(_saved_results(tmp_path / "out")) == 4


# ---------------------------------------------------------------- memory


def _rss_mib() -> float:
    """Resident set size of this process (VmRSS in /proc/self/status), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


class _RSSProbe(DatasetEvaluator):
    """Records the RSS once ``warmup`` images have been processed and after the last one."""

    def __init__(self, warmup: int, total: int):
        self._marks = (warmup, total)

    def reset(self):
        self.seen = 0
        self.rss = {}

    def process(self, inputs, outputs):
        before, self.seen = self.seen, self.seen + len(inputs)
        for mark in self._marks:
            if before < mark <= self.seen:
                self.rss[mark] = _rss_mib()


@pytest.mark.slow
def test_memory_stays_flat_over_2000_images(tmp_path):
    num_images, warmup, dets_per_image = 2000, 200, 3
    files, _ = _shapes(tmp_path, 8)  # 8 distinct files, each used 250 times
    dicts = [dict(files[i % len(files)], image_id=i + 1) for i in range(num_images)]
    name = _register("eval_test_memory", dicts)
    # threshold 0: every image keeps its top 3 boxes, so the evaluator stores 6000 results
    model, loader = _tiny_model_and_loader(
        dicts, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", dets_per_image, batch_size=8
    )
    evaluator = RetinaFocalCOCOEvaluator(name, output_dir=str(tmp_path / "out"))
    probe = _RSSProbe(warmup, num_images)
    results = inference_on_dataset(model, loader, [evaluator, probe])
    assert set(results["bbox"]) >= set(METRICS)
    stored = sum(len(p["instances"]) for p in evaluator._predictions)
    assert stored == num_images * dets_per_image
    growth = probe.rss[num_images] - probe.rss[warmup]
    # What the evaluator legitimately keeps for the 1800 images after the warm-up: per image a
    # {"image_id", "instances"} dict and list (~0.3 KiB), per detection a 4-key dict, a 4-float
    # bbox list and its floats (~0.6 KiB): 1800 * (0.3 + 3 * 0.6) KiB ~ 4 MiB (measured: 3.5).
    # The other 8 MiB are slack for the allocator. Leaking one 3x64x64 float input per image
    # would add 1800 * 48 KiB ~ 84 MiB (tried: +96 MiB).
    bound = 12.0
    assert growth < bound, f"RSS {probe.rss[warmup]:.1f} -> {probe.rss[num_images]:.1f} MiB (+{growth:.1f})"


# ---------------------------------------------------------------- unusable images


def test_an_unusable_test_image_is_left_out_and_ap_is_over_the_others(tmp_path):
    """A truncated image in the test set used to stop the evaluation in the data loader; now
    the trainer's test loader leaves it out (named in a warning) and the evaluator scores the
    images it saw, so the missing one does not count as all-missed."""
    json_file, image_root = generate_split(ShapesSplit("val", num_images=6, image_size=PX), str(tmp_path))
    name = _register("eval_test_truncated", [], json_file)
    dicts = load_coco_json(json_file, image_root, dataset_name=name)  # contiguous class ids, as registered sets
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    broken = dicts[2]["file_name"]
    with open(broken, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    cfg = small_cfg("INPUT.MIN_SIZE_TEST", PX, "INPUT.MAX_SIZE_TEST", PX, "DATASETS.TEST", (name,),
                    "MODEL.RETINANET.NUM_CLASSES", len(SHAPE_CLASSES), "OUTPUT_DIR", str(tmp_path / "out"))
    loader = RetinaFocalTrainer.build_test_loader(cfg, name)
    assert len(loader.dataset) == 5
    evaluator = RetinaFocalCOCOEvaluator(name, output_dir=str(tmp_path / "ours"))
    kept = [d for d in dicts if d["file_name"] != broken]
    with _notes() as notes:
        got = _evaluate(evaluator, kept, _ground_truth_as_detections)
    assert got["bbox"]["AP"] == pytest.approx(100.0)  # perfect on the 5 images it saw
    assert any(f"1 of the 6 images of '{name}' were not predicted" in n for n in notes), notes
