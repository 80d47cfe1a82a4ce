"""tools/export.py: the torch.export program (.pt2) and its ONNX give PyTorch's head outputs
(1e-4) at two input sizes, and, through retina_focal.export.postprocess, PyTorch's detections."""
import os
import re

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.export import padded_for_export, postprocess
from retina_focal.export.predictor import load_inference_model

from tests.conftest import REPO, small_cfg

from tools import export as export_tool

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# Threshold 0: the untrained model's scores (~0.01, the prior) all pass, so there are
# detections to compare; TOPK small keeps NMS short.
OPTS = ["INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 512, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 200, "TEST.DETECTIONS_PER_IMAGE", 30]
SIZES = [(256, 320), (300, 270)]  # the second is not a multiple of 32 (padded to 320 x 288)
FORMATS = ["pt2", "onnx"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both formats exported by the command line (on its default blank image, 256 px: dynamic
    H and W), the PyTorch model they came from, and the loaded programs as callables of a
    resized (not padded) image returning numpy arrays."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = small_cfg(*OPTS)
    RetinaFocalCheckpointer(build_model(cfg), save_dir=str(root)).save("model")
    (root / "config.yaml").write_text(cfg.dump())
    cfg.MODEL.WEIGHTS = str(root / "model.pth")
    for fmt in FORMATS:
        args = ["--format", fmt, "--config-file", str(root / "config.yaml"), "--output", str(root / fmt),
                "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS]
        assert export_tool.main(args) == 0
    model = load_inference_model(cfg, backend=False)
    program = torch.export.load(str(root / "pt2" / "model.pt2")).module()
    session = ort.InferenceSession(str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    runners = {
        "pt2": lambda x: [y.detach().numpy() for y in program(padded_for_export(model, x))],
        "onnx": lambda x: session.run(None, {"image": padded_for_export(model, x).numpy()}),
    }
    return model, runners, root


def _reference(model, image):
    """PyTorch's logits, deltas and anchors for one (3, H, W) image, by the model itself."""
    with torch.no_grad():
        anchors, logits, deltas = model.predict(model.preprocess_image([{"image": image}]))
    return [x.numpy() for x in logits + deltas] + [a.tensor.numpy() for a in anchors]


@pytest.mark.parametrize("fmt", FORMATS)
def test_head_outputs_match_pytorch_at_two_sizes(exported, fmt):
    model, runners, _ = exported
    for size in SIZES:
        image = torch.rand(3, *size) * 255
        expected = _reference(model, image)
        got = runners[fmt](image[None])
        assert [g.shape for g in got] == [e.shape for e in expected]
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        print(f"\n{fmt} {size}: max abs difference of logits/deltas/anchors {diff:.3g}")
        assert diff < TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
def test_detections_after_postprocess_match_pytorch(exported, fmt):
    model, runners, _ = exported
    image, original_size = torch.rand(3, *SIZES[1]) * 255, (150, 105)
    with torch.no_grad():
        expected = model([{"image": image, "height": original_size[0], "width": original_size[1]}])[0]["instances"]
    got = postprocess(model, runners[fmt](image[None]), SIZES[1], original_size)
    assert len(got) == len(expected) == 30
    assert got.image_size == expected.image_size == original_size
    assert torch.equal(got.pred_classes, expected.pred_classes)
    assert torch.allclose(got.scores, expected.scores, atol=TOLERANCE, rtol=0)
    box_diff = float((got.pred_boxes.tensor - expected.pred_boxes.tensor).abs().max())
    print(f"\n{fmt}: max abs difference of final boxes {box_diff:.3g} px")
    assert box_diff < 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_blank_image_gives_no_detections(exported, fmt):
    """At the paper's 0.05 threshold an untrained model (scores ~0.01) detects nothing."""
    model, runners, _ = exported
    model_05 = build_model(small_cfg(*OPTS, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.05)).eval()
    blank = torch.zeros(1, 3, 256, 256)
    got = postprocess(model_05, runners[fmt](blank), (256, 256), (256, 256))
    assert len(got) == 0 and got.pred_boxes.tensor.shape == (0, 4)


def test_missing_weights_are_named(exported, capsys):
    root = exported[2]
    args = ["--format", "onnx", "--config-file", str(root / "config.yaml"), "--output", str(root / "bad"),
            "MODEL.WEIGHTS", str(root / "nope.pth")]
    assert export_tool.main(args) == 2
    assert "MODEL.WEIGHTS" in capsys.readouterr().err and not os.path.exists(root / "bad" / "model.onnx")


@pytest.mark.parametrize("weights", ["", "foreign"])
def test_weights_that_fit_nothing_or_none_are_refused(exported, capsys, tmp_path, weights):
    """Used to write a program for a torchvision ResNet-18 state_dict (a random network)."""
    from tests.test_predict import foreign_weights

    root = exported[2]
    if weights == "foreign":
        weights = foreign_weights(tmp_path / "resnet18.pth")
    args = ["--format", "pt2", "--config-file", str(root / "config.yaml"), "--output", str(tmp_path / "out"),
            "MODEL.WEIGHTS", weights]
    assert export_tool.main(args) == 2
    err = capsys.readouterr().err
    assert ("does not fit the model" in err) if weights else ("MODEL.WEIGHTS is empty" in err)
    assert not os.path.exists(tmp_path / "out" / "model.pt2")


def test_getting_started_onnx_example_runs(exported, tmp_path):
    """docs/getting_started.md's post-processing example, on the exported test model."""
    with open(os.path.join(REPO, "docs", "getting_started.md")) as f:
        (block,) = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "postprocess" in b]
    root = exported[2]
    (root / "export").mkdir(exist_ok=True)
    for name, source in (("config.yaml", "onnx/config.yaml"), ("model.onnx", "onnx/model.onnx")):
        (root / "export" / name).write_bytes((root / source).read_bytes())
    cv2.imwrite(str(tmp_path / "img.png"), np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    code = block.replace("output/export", str(root / "export")).replace('"img.png"', repr(str(tmp_path / "img.png")))
    namespace = {}
    exec(compile(code, "docs/getting_started.md", "exec"), namespace)
    instances = namespace["instances"]
    assert instances.image_size == (50, 70) and len(instances) == 30  # threshold 0 in the exported config


def test_a_small_sample_exports_a_program_for_its_size_only(exported, tmp_path, capsys):
    """Below twice the largest stride (P7: 128 px, so 256) a level would have 1 cell, which
    torch.export specializes: the program is static, and the tool says so."""
    root = exported[2]
    args = ["--format", "pt2", "--config-file", str(root / "config.yaml"), "--output", str(tmp_path),
            "MODEL.WEIGHTS", str(root / "model.pth"), "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
    assert export_tool.main(args) == 0
    assert "(1, 3, 128, 128) inputs only" in capsys.readouterr().out
    model = exported[0]
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    image = torch.rand(1, 3, 128, 128) * 255
    got = [y.detach().numpy() for y in program(padded_for_export(model, image))]
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, _reference(model, image[0]))) < TOLERANCE
