"""retina_focal/diagnostics/thresholds.py and tools/tune_thresholds.py: per-class thresholds by
F1 or a target precision, written beside the weights and picked up by retina-focal-predict."""
import json
import os

import pytest
import torch

from retina_focal.diagnostics.error_analysis import ImageBoxes
from retina_focal.diagnostics.thresholds import (
    ClassThreshold,
    read_thresholds,
    scores_at_threshold,
    tune_thresholds,
    write_thresholds,
)
from retina_focal.predict import main as predict_main
from tests.test_train_net import CONFIG, TINY, trained  # noqa: F401  (the module's trained model)
from tools import tune_thresholds as tool


def _boxes(rows, scores=None):
    boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
    classes = torch.tensor([r[4] for r in rows], dtype=torch.int64)
    return ImageBoxes(boxes, classes, torch.tensor(scores if scores is not None else [1.0] * len(rows)))


def test_f1_and_target_precision_by_hand():
    # class 0: two boxes; detections 0.9 (hit), 0.8 (miss), 0.7 (hit), 0.3 (miss)
    gt = {1: _boxes([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]])}
    det = {1: _boxes([[0, 0, 10, 10, 0], [50, 50, 60, 60, 0], [20, 20, 30, 31, 0], [70, 70, 80, 80, 0]], [0.9, 0.8, 0.7, 0.3])}
    names = ["a", "b"]
    best_f1, nothing = tune_thresholds(gt, det, names)
    assert (best_f1.threshold, best_f1.precision, best_f1.recall) == pytest.approx((0.7, 2 / 3, 1.0))
    assert best_f1.f1 == pytest.approx(0.8) and best_f1.num_ground_truth == 2
    assert (nothing.threshold, nothing.recall, nothing.tuned) == (0.3, 0.0, False)  # class b: no box: the default
    precise, _ = tune_thresholds(gt, det, names, target_precision=0.9)
    assert (precise.threshold, precise.precision, precise.recall) == pytest.approx((0.9, 1.0, 0.5))
    fixed, empty = scores_at_threshold(gt, det, names, 0.75)  # keeps 0.9 (hit) and 0.8 (miss)
    assert (fixed.threshold, fixed.precision, fixed.recall, fixed.f1) == pytest.approx((0.75, 0.5, 0.5, 0.5))
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    assert scores_at_threshold(gt, det, names, 0.95)[0].recall == 0.0  # nothing kept
    duplicate = {1: _boxes([[0, 0, 10, 10, 0], [0, 0, 10, 10, 0]], [0.9, 0.8])}  # one box matched once
    assert tune_thresholds(gt, duplicate, names)[0].precision == pytest.approx(1.0)


@pytest.mark.slow
def test_the_tool_writes_the_json_beside_the_weights_and_predict_uses_it(trained, tmp_path, capsys):  # noqa: F811
    out, _ = trained
    weights = os.path.join(out, "model_final.pth")
    thresholds = tool.main(["--config-file", CONFIG, "--weights", weights, "--eval-dir", str(tmp_path / "eval")]
                           + [str(v) for v in TINY] + ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    printed = capsys.readouterr().out
    assert "CLASS_SCORE_THRESH: [" in printed and len(thresholds) == 5
    assert "for comparison, one threshold 0.3 for every class" in printed
    path = os.path.join(out, "class_thresholds.json")
    assert json.load(open(path))["criterion"] == "best F1 at IoU 0.5"
    assert read_thresholds(path, [t.name for t in thresholds]) == [t.threshold for t in thresholds]
    with pytest.raises(ValueError, match="holds thresholds for the classes"):
        read_thresholds(path, ["x"])
    image = os.path.join(os.environ["RETINA_FOCAL_DATASETS"], "retina_focal_shapes")
    image = next(os.path.join(r, f) for r, _, fs in os.walk(image) for f in sorted(fs) if f.endswith(".png"))
    assert predict_main(["--config-file", CONFIG, "--input", image, "--output", str(tmp_path / "p"), "MODEL.WEIGHTS", weights]
                        + [str(v) for v in TINY]) == 0
    assert f"per-class thresholds from {path}" in capsys.readouterr().out


def test_a_class_that_cannot_be_tuned_keeps_the_default_with_a_warning(caplog):
    """A tuning set without a box of class 'blob' used to write 'blob: 1.0', and predict then
    never drew a blob again."""
    gt = {1: _boxes([[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]])}
    det = {1: _boxes([[0, 0, 10, 10, 0], [60, 60, 70, 70, 1], [40, 40, 50, 50, 2]], [0.9, 0.8, 0.7])}
    with caplog.at_level("WARNING", logger="retina_focal.diagnostics.thresholds"):
        a, b, blob = tune_thresholds(gt, det, ["a", "b", "blob"], default=0.25)
    assert a.tuned and a.threshold == pytest.approx(0.9)
    assert (b.threshold, b.tuned) == (0.25, False) and (blob.threshold, blob.tuned) == (0.25, False)
    assert "class 'b' cannot be tuned (no detection of it matches a box at the criterion)" in caplog.text
    assert "class 'blob' cannot be tuned (no box of it in the tuning set): it keeps the default threshold 0.25" in caplog.text


def test_reading_a_threshold_of_one_warns_that_the_class_is_never_predicted(tmp_path, caplog):
    path = write_thresholds([ClassThreshold("a", 0.4, 1, 1, 1, 1), ClassThreshold("blob", 1.0, 0, 0, 0, 0)], str(tmp_path / "t.json"), "x")
    with caplog.at_level("WARNING", logger="retina_focal.diagnostics.thresholds"):
        assert read_thresholds(path, ["a", "blob"]) == [0.4, 1.0]
    assert "the classes ['blob'] have a threshold of 1 or more and will never be predicted" in caplog.text
