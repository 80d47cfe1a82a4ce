"""TEST.EVALUATOR faster_coco_eval: the metrics of pycocotools to 1e-4, chosen by config."""
import json
import math
import re
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from retina_focal.engine.trainer import RetinaFocalTrainer
from retina_focal.evaluation import RetinaFocalCOCOEvaluator, RetinaFocalFastCOCOEvaluator

from tests.conftest import small_cfg

from tools import bench_eval

pytest.importorskip("faster_coco_eval")

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A registered 150-image generated set (json file) and its noisy detections."""
    gt, detections = bench_eval.synthetic_set(150, num_classes=NUM_CLASSES, seed=1)
    json_file = str(tmp_path_factory.mktemp("fast_eval") / "gt.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    name = "fast_eval_test"
    DatasetCatalog.register(name, lambda: [{"image_id": im["id"]} for im in gt["images"]])
    MetadataCatalog.get(name).set(thing_classes=[c["name"] for c in gt["categories"]], json_file=json_file)
    yield name, detections
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _saved_results(output_dir) -> list:
    with open(output_dir / "coco_instances_results.json") as f:
        return json.load(f)


def _evaluate(evaluator, detections) -> dict:
    evaluator.reset()
    for image_id, (boxes, scores, classes) in detections.items():
        instances = Instances(
            (bench_eval.IMAGE_SIZE, bench_eval.IMAGE_SIZE),
            pred_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
            scores=torch.as_tensor(scores, dtype=torch.float32),
            pred_classes=torch.as_tensor(classes),
        )
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()


def test_same_metrics_as_pycocotools(dataset, tmp_path):
    name, detections = dataset
    slow = RetinaFocalCOCOEvaluator(name, output_dir=str(tmp_path / "slow"), use_fast_impl=False)
    fast = RetinaFocalFastCOCOEvaluator(name, output_dir=str(tmp_path / "fast"))
    calls = []

    class Spy(fast._cocoeval_cls):  # proves faster-coco-eval, not pycocotools, computed `got`
        def evaluate(self):
            calls.append(type(self).__mro__[1].__module__)
            super().evaluate()

    fast._cocoeval_cls = Spy
    expected, got = _evaluate(slow, detections), _evaluate(fast, detections)
    assert calls == ["faster_coco_eval.core.faster_eval_api"]
    assert list(got) == list(expected) == ["bbox"]
    assert list(got["bbox"]) == list(expected["bbox"])  # AP ... APl, AP-class0 ...
    assert 10 < expected["bbox"]["AP"] < 90  # neither trivial nor perfect
    for key, value in expected["bbox"].items():
        assert math.isfinite(value) and got["bbox"][key] == pytest.approx(value, abs=1e-4), key
    assert _saved_results(tmp_path / "slow") == _saved_results(tmp_path / "fast") != []


def test_missing_package_names_the_key_and_pip(monkeypatch, dataset):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"TEST.EVALUATOR 'faster_coco_eval'.*pip install faster-coco-eval"):
        RetinaFocalFastCOCOEvaluator(dataset[0])


@pytest.mark.parametrize(
    "name, cls", [("coco", RetinaFocalCOCOEvaluator), ("faster_coco_eval", RetinaFocalFastCOCOEvaluator)]
)
def test_trainer_builds_the_configured_evaluator(dataset, tmp_path, name, cls):
    cfg = small_cfg("TEST.EVALUATOR", name, "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", (dataset[0],))
    assert type(RetinaFocalTrainer.build_evaluator(cfg, dataset[0])) is cls


def test_unknown_evaluator_lists_the_names(dataset, tmp_path):
    cfg = small_cfg("TEST.EVALUATOR", "lvis", "OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", (dataset[0],))
    with pytest.raises(ValueError, match=r"TEST.EVALUATOR must be one of \['coco', 'faster_coco_eval'\], got 'lvis'"):
        RetinaFocalTrainer.build_evaluator(cfg, dataset[0])


def test_bench_eval_script_times_both_and_gets_the_same_ap(capsys):
    bench_eval.main(["--num-images", "30", "--repeats", "1"])
    out = capsys.readouterr().out
    aps = re.findall(r"AP (\d\.\d+)", out)
    assert "pycocotools: median" in out and "faster-coco-eval: median" in out and "speed-up:" in out
    assert len(aps) == 2 and aps[0] == aps[1]
