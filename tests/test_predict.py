"""retina_focal.predict: images, folders and videos in; drawings and COCO results out,
equal to detectron2's DefaultPredictor; bad inputs skipped with a summary."""
import importlib
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.predict import main

from tests.conftest import REPO, small_cfg

# Untrained, every score is near the prior 0.01 (§3.3): keep all candidates and draw/write
# those above the median score, so the --confidence filter has something on both sides.
OPTS = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "TEST.DETECTIONS_PER_IMAGE", 20]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """config.yaml (small_cfg + OPTS) and a checkpoint of that model, with its cfg."""
    root = tmp_path_factory.mktemp("predict_model")
    torch.manual_seed(0)
    cfg = small_cfg(*OPTS)
    RetinaFocalCheckpointer(build_model(cfg), save_dir=str(root)).save("model")
    config = root / "config.yaml"
    config.write_text(cfg.dump())
    cfg.MODEL.WEIGHTS = str(root / "model.pth")
    return str(config), cfg.MODEL.WEIGHTS, cfg


def _images(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def _threshold_in_a_gap(scores: torch.Tensor) -> float:
    """A threshold between two scores of the middle half, at their widest gap, so that
    float noise between a batched and a single forward pass cannot move a box across it."""
    s = scores.sort().values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    i = lo + int((s[lo + 1 : hi + 1] - s[lo:hi]).argmax())
    return float(s[i] + s[i + 1]) / 2


def _run(model_files, inputs, out, *extra):
    config, weights, _ = model_files
    return main(["--config-file", config, "--input", *inputs, "--output", str(out), *extra, "MODEL.WEIGHTS", weights])


def _results(path):
    with open(path) as f:
        return json.load(f)


def test_folder_recursive_batched_equals_default_predictor(model_files, tmp_path):
    folder = tmp_path / "in"
    # one size: images of different sizes in a batch are padded to a common size, which moves
    # the scores slightly (as in detectron2's batched inference)
    paths = _images(folder, [(64, 80), (64, 80)]) + _images(folder / "sub", [(64, 80)])
    (folder / "notes.txt").write_text("not an image")  # ignored inside a folder
    paths.sort(key=lambda p: (os.path.dirname(p), p))  # the walk's order: a folder's files, then subfolders
    reference = DefaultPredictor(model_files[2])
    expected_all = [reference(cv2.imread(path))["instances"] for path in paths]
    confidence = _threshold_in_a_gap(torch.cat([x.scores for x in expected_all]))
    assert _run(model_files, [str(folder)], tmp_path / "out", "--batch-size", "2", "--confidence", repr(confidence)) == 0
    results = _results(tmp_path / "out" / "results.json")
    assert 0 < len(results) < 3 * 20  # the filter kept some and dropped some
    for image_id, (path, expected) in enumerate(zip(paths, expected_all), start=1):
        expected = expected[expected.scores >= confidence]
        got = [r for r in results if r["image_id"] == image_id]
        assert len(got) == len(expected) and all(r["file_name"] == path for r in got)
        np.testing.assert_allclose([r["score"] for r in got], expected.scores.numpy(), atol=1e-4)
        boxes = expected.pred_boxes.tensor.numpy()
        np.testing.assert_allclose([r["bbox"] for r in got], np.hstack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]), atol=1e-3)
        assert [r["category_id"] for r in got] == expected.pred_classes.tolist()
        drawing = cv2.imread(str(tmp_path / "out" / os.path.relpath(path, folder)))
        assert drawing.shape == cv2.imread(path).shape and not np.array_equal(drawing, cv2.imread(path))


def test_video_frames_are_predicted_and_drawn_into_a_video(model_files, tmp_path):
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    rng = np.random.default_rng(1)
    for _ in range(4):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    assert _run(model_files, [video], tmp_path / "out", "--confidence", "0", "--json", str(tmp_path / "r.json")) == 0
    results = _results(tmp_path / "r.json")
    assert sorted({(r["image_id"], r["frame"]) for r in results}) == [(1, 0), (2, 1), (3, 2), (4, 3)]
    drawn = cv2.VideoCapture(str(tmp_path / "out" / "clip.avi"))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 4 and drawn.read()[1].shape == (48, 64, 3)


def test_bad_inputs_are_skipped_with_a_summary(model_files, tmp_path, capsys):
    good = _images(tmp_path / "in", [(64, 64)])[0]
    corrupt = tmp_path / "in" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 definitely not a jpeg")
    corrupt_video = tmp_path / "in" / "corrupt.mp4"
    corrupt_video.write_bytes(b"not a video either")
    text = tmp_path / "in" / "notes.txt"
    text.write_text("hello")
    missing = str(tmp_path / "missing.png")
    inputs = [missing, str(corrupt), str(corrupt_video), str(text), good]
    status = _run(model_files, inputs, tmp_path / "out", "--confidence", "0")
    err = capsys.readouterr().err
    assert status == 1
    summary = err[err.index("Skipped 4 input(s):"):]
    assert f"{missing}: no such file or folder" in summary and f"{corrupt}: cannot be read as an image" in summary
    assert f"{corrupt_video}: no frame can be read from this video" in summary
    assert f"{text}: not an image (.jpg" in summary
    assert {r["file_name"] for r in _results(tmp_path / "out" / "results.json")} == {good}
    assert os.path.isfile(tmp_path / "out" / "img0.png")


def test_weights_for_another_num_classes_give_a_clear_message(model_files, tmp_path):
    """The command line itself (python -m), with a config of 5 classes and 3-class weights."""
    config, weights, _ = model_files
    image = _images(tmp_path, [(64, 64)])[0]
    cmd = [sys.executable, "-m", "retina_focal.predict", "--config-file", config, "--input", image,
           "--output", str(tmp_path / "out"), "MODEL.WEIGHTS", weights, "MODEL.RETINANET.NUM_CLASSES", "5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "trained for 3 classes, the model has 5 (MODEL.RETINANET.NUM_CLASSES)" in proc.stderr
    assert "error: cannot run" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_points_at_main():
    with open(os.path.join(REPO, "setup.py")) as f:
        entry = re.search(r'"retina-focal-predict=([\w.]+):(\w+)"', f.read())
    assert entry and importlib.import_module(entry.group(1)).__dict__[entry.group(2)] is main


def test_missing_weights_name_the_key(model_files, tmp_path, capsys):
    config = model_files[0]
    args = ["--config-file", config, "--input", str(tmp_path), "--output", str(tmp_path / "o"),
            "MODEL.WEIGHTS", str(tmp_path / "nope.pth")]
    assert main(args) == 2
    assert f"MODEL.WEIGHTS '{tmp_path / 'nope.pth'}': no such file" in capsys.readouterr().err
