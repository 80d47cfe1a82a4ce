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
from retina_focal.config.load import load_config
from retina_focal.predict import _metadata, main

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
    assert f"{missing}: no such file or folder" in summary and f"{corrupt}: cannot be decoded (" in summary
    assert f"{corrupt_video}: no frame can be read from this video" in summary
    assert f"{text}: not an image (.jpg" in summary
    assert {r["file_name"] for r in _results(tmp_path / "out" / "results.json")} == {good}
    assert os.path.isfile(tmp_path / "out" / "img0.png")


@pytest.mark.slow
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
    assert "REINIT_MISMATCHED_CLASSIFIER" not in proc.stderr  # following it would predict with a random classifier


def test_console_script_points_at_main():
    with open(os.path.join(REPO, "setup.py")) as f:
        entry = re.search(r'"retina-focal-predict=([\w.]+):(\w+)"', f.read())
    assert entry and importlib.import_module(entry.group(1)).__dict__[entry.group(2)] is main


def test_missing_weights_name_the_key(model_files, tmp_path, capsys):
    config = model_files[0]
    image = _images(tmp_path / "in", [(64, 64)])[0]
    args = ["--config-file", config, "--input", image, "--output", str(tmp_path / "o"),
            "MODEL.WEIGHTS", str(tmp_path / "nope.pth")]
    assert main(args) == 2
    assert f"MODEL.WEIGHTS '{tmp_path / 'nope.pth'}': no such file" in capsys.readouterr().err


def _truncated(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_elongated_and_truncated_images_are_skipped_and_the_rest_is_written(model_files, tmp_path, capsys):
    """A 1 x 2000 px image used to kill the run in ResizeTransform ("height and width must be
    > 0") and lose results.json; a truncated JPEG used to be predicted half grey."""
    folder = tmp_path / "in"
    good = _images(folder, [(64, 64)])[0]
    rng = np.random.default_rng(2)
    thin, flat = str(folder / "thin.png"), str(folder / "flat.png")
    cv2.imwrite(thin, rng.integers(0, 256, (2000, 1, 3), dtype=np.uint8))
    cv2.imwrite(flat, rng.integers(0, 256, (1, 2000, 3), dtype=np.uint8))
    jpeg = str(folder / "half.jpg")
    cv2.imwrite(jpeg, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _truncated(jpeg)
    assert _run(model_files, [str(folder)], tmp_path / "out", "--confidence", "0") == 1
    summary = capsys.readouterr().err.split("Skipped 3 input(s):")[1]
    assert f"{flat}: 2000x1 px: resized to a short side of 64 px with the long side at most 128 px" in summary
    assert f"{thin}: 1x2000 px" in summary and "(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)" in summary
    assert f"{jpeg}: cannot be decoded (OSError: image file is truncated" in summary
    assert {r["file_name"] for r in _results(tmp_path / "out" / "results.json")} == {good}


def test_an_image_the_model_fails_on_is_skipped_and_an_interrupted_run_keeps_its_results(
    model_files, tmp_path, capsys, monkeypatch
):
    import retina_focal.predict as predict_module

    folder = tmp_path / "in"
    paths = _images(folder, [(64, 64), (64, 77), (64, 64)])
    call = predict_module.BatchPredictor.__call__

    def failing(self, images):
        if any(image.shape[1] == 77 for image in images):
            raise RuntimeError("injected failure")
        return call(self, images)

    monkeypatch.setattr(predict_module.BatchPredictor, "__call__", failing)
    assert _run(model_files, [str(folder)], tmp_path / "out", "--confidence", "0", "--batch-size", "2") == 1
    assert f"{paths[1]}: the model failed on it (RuntimeError: injected failure)" in capsys.readouterr().err
    assert {r["file_name"] for r in _results(tmp_path / "out" / "results.json")} == {paths[0], paths[2]}

    def interrupted(self, images):
        if any(image.shape[1] == 77 for image in images):
            raise KeyboardInterrupt
        return call(self, images)

    monkeypatch.setattr(predict_module.BatchPredictor, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(model_files, [str(folder)], tmp_path / "out2", "--confidence", "0")
    assert {r["file_name"] for r in _results(tmp_path / "out2" / "results.json")} == {paths[0]}


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "error: no image or video to predict in --input"),
        ("confidence", "error: --confidence must be a score in [0, 1], got 5.0"),
        ("output", "error: cannot write into"),
    ],
)
def test_arguments_that_would_predict_nothing_are_errors(model_files, tmp_path, capsys, case, message):
    image = _images(tmp_path / "in", [(64, 64)])[0]
    inputs, out, extra = [image], tmp_path / "out", []
    if case == "empty folder":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        inputs = [str(tmp_path / "empty")]
    elif case == "confidence":
        extra = ["--confidence", "5"]
    else:
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "out"  # a folder below a file cannot be made
    assert _run(model_files, inputs, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err
    if case == "empty folder":
        assert f"{tmp_path / 'empty'}: folder holds no image (.jpg" in err


def foreign_weights(path) -> str:
    """A torchvision ResNet-18 state_dict: no key of it is a RetinaFocal key."""
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


def test_weights_that_fit_nothing_are_refused(model_files, tmp_path, capsys):
    config, _, _ = model_files
    image = _images(tmp_path / "in", [(64, 64)])[0]
    weights = foreign_weights(tmp_path / "resnet18.pth")
    args = ["--config-file", config, "--input", image, "--output", str(tmp_path / "out"), "MODEL.WEIGHTS", weights]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"Checkpoint {weights} does not fit the model:" in err
    assert re.search(r"\d+ of the model's \d+ tensors are not in it \(backbone\.fpn_lateral3\.weight", err)
    assert "of the checkpoint's tensors are unknown to the model (conv1.weight" in err
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_empty_weights_are_refused(model_files, tmp_path, capsys):
    config = model_files[0]
    image = _images(tmp_path / "in", [(64, 64)])[0]
    assert main(["--config-file", config, "--input", image, "--output", str(tmp_path / "o"), "MODEL.WEIGHTS", ""]) == 2
    assert "MODEL.WEIGHTS is empty: inference needs trained weights" in capsys.readouterr().err


def test_test_time_augmentation_is_used_when_enabled(model_files, tmp_path):
    from retina_focal.predict import BatchPredictor
    from retina_focal.modeling.tta import RetinaFocalWithTTA

    image = _images(tmp_path / "in", [(64, 80)])[0]
    assert _run(model_files, [image], tmp_path / "out", "--confidence", "0", "TEST.AUG.ENABLED", "True",
                "TEST.AUG.MIN_SIZES", "(48, 64)", "TEST.AUG.MAX_SIZE", "160") == 0
    assert _results(tmp_path / "out" / "results.json")
    cfg = model_files[2].clone()
    cfg.TEST.AUG.ENABLED = True
    assert isinstance(BatchPredictor(cfg).model, RetinaFocalWithTTA)


def _snapshot(folder):
    return {p: open(p, "rb").read() for p in sorted(str(x) for x in folder.rglob("*") if x.is_file())}


@pytest.mark.parametrize("output", [".", "sub", "sub/deeper"])
def test_an_output_in_an_input_folder_is_refused_before_anything_is_written(model_files, tmp_path, output, capsys):
    """--input photos --output photos used to draw over every photo (exit 0); a later run then
    predicted on the drawings."""
    folder = tmp_path / "photos"
    _images(folder, [(64, 80)]) + _images(folder / "sub", [(64, 80)])
    before = _snapshot(folder)
    assert _run(model_files, [str(folder)], folder / output) == 2
    assert "input folder" in capsys.readouterr().err
    assert _snapshot(folder) == before  # no drawing, no results.json


def test_an_output_that_is_an_input_file_is_refused(model_files, tmp_path, capsys):
    (image,) = _images(tmp_path / "in", [(64, 80)])
    before = open(image, "rb").read()
    assert _run(model_files, [image], tmp_path / "in") == 2
    assert f"the output {image} of {image} is an input file" in capsys.readouterr().err
    assert open(image, "rb").read() == before


def test_inputs_with_one_file_name_keep_a_drawing_each_under_their_relative_paths(model_files, tmp_path):
    a, b = _images(tmp_path / "a", [(64, 80)]), _images(tmp_path / "b", [(72, 96)])
    out = tmp_path / "out"
    assert _run(model_files, a + b, out, "--confidence", "0") == 0
    assert cv2.imread(str(out / "a" / "img0.png")).shape[:2] == (64, 80)
    assert cv2.imread(str(out / "b" / "img0.png")).shape[:2] == (72, 96)
    assert {r["file_name"] for r in _results(out / "results.json")} == {a[0], b[0]}


def test_a_runs_config_predicts_without_its_training_data_and_names_classes_from_the_training_set(model_files, tmp_path, capsys):
    """The run's config.yaml keeps its dataset specs: predict and export needed the training
    data on the machine, and took class names from DATASETS.TEST[0] only."""
    import shutil

    from tests.data.test_formats import _csv, _image

    _, weights, cfg = model_files
    data = tmp_path / "data"
    _image(data / "a.png")
    _csv(data, ["a.png,1,2,30,20,dog"], ["cat", "dog", "cow"])
    train = f"csv:{data / 'ann.csv'}:{data / 'classes.csv'}"
    config = tmp_path / "config.yaml"
    run_cfg = cfg.clone()
    run_cfg.DATASETS.TRAIN, run_cfg.DATASETS.TEST = (train,), ()
    config.write_text(run_cfg.dump())
    (image,) = _images(tmp_path / "in", [(64, 80)])
    args = ["--config-file", str(config), "--input", image, "--confidence", "0", "MODEL.WEIGHTS", weights]
    assert main(args[:4] + ["--output", str(tmp_path / "named")] + args[4:]) == 0
    assert _metadata(load_config(str(config), for_inference=True)).thing_classes == ["cat", "dog", "cow"]
    shutil.rmtree(data)  # another machine (a new process): the weights and the config, no training data
    bare = subprocess.run([sys.executable, "-m", "retina_focal.predict", *args[:4], "--output", str(tmp_path / "bare"), *args[4:]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert _results(tmp_path / "bare" / "results.json")  # exit 0 and detections, without the data
