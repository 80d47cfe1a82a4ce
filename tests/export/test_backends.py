"""retina_focal/export/backends.py (TEST.BACKEND.*): the compiled and ONNX Runtime networks give the
eager model's detections (same classes, scores within 1e-4, boxes within 1e-3 px) on an image
served by the dynamic-shape program and on a 128-px one that gets a program of its own; what
they build is cached and loaded by the next run; TEST.AMP is compiled in; int8 is quantized
from the training images; --backend on retina-focal-predict and tools/export.py; settings that
fit nothing are named. (--eval-only --backend: tests/test_train_net.py.)"""
import json
import logging
import os

import cv2
import numpy as np
import onnx
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.data import register_builtin_shapes
from retina_focal.export import ExportableRetinaFocal, padded_for_export
from retina_focal.export.backends import (
    build_inference_model,
    check_backend_settings,
    network_key,
    resolve_auto_backend,
)
from retina_focal.export.quantization import load_int8
from retina_focal.predict import main as predict_main
from retina_focal.utils.testing import (
    make_detections_nontrivial,
    matched_results_share,
    paired_detection_rows,
)
from tests.conftest import small_cfg
from tools.export import main as export_main

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

pytest.importorskip("onnxruntime")

# Threshold 0 and redrawn output convs: detections with distinct scores to compare.
OPTS = ["INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 512, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 200, "TEST.DETECTIONS_PER_IMAGE", 30]
BACKENDS = ["compiled", "onnxruntime"]
SCORE_TOLERANCE, BOX_TOLERANCE = 1e-4, 1e-3


def _inputs():
    """An image padded to 320 x 288 (the dynamic-shape program), returned at another output
    size, and a 128-px one (below 256 px: a fixed-size program)."""
    g = torch.Generator().manual_seed(1)
    return [
        {"image": torch.rand(3, 300, 270, generator=g) * 255, "height": 150, "width": 105},
        {"image": torch.rand(3, 128, 128, generator=g) * 255},
    ]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """(cfg, model, inputs, the eager detections); cfg caches into a temp dir."""
    cfg = small_cfg(*OPTS, "TEST.BACKEND.CACHE_DIR", str(tmp_path_factory.mktemp("backend_cache")))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = _inputs()
    with torch.no_grad():
        make_detections_nontrivial(model, inputs[:1])
        expected = [model([x])[0]["instances"] for x in inputs]  # one at a time, as the backends run
    return cfg, model, inputs, expected


def _with(cfg, *opts):
    cfg = cfg.clone()
    cfg.merge_from_list(list(opts))
    return cfg


def assert_same_detections(expected, got):
    assert got.image_size == expected.image_size
    a, b = paired_detection_rows(expected, got)
    assert a.shape == b.shape and len(a) == 30
    assert torch.equal(a[:, 1], b[:, 1]), "classes differ"
    assert float((a[:, 0] - b[:, 0]).abs().max()) < SCORE_TOLERANCE
    assert float((a[:, 2:] - b[:, 2:]).abs().max()) < BOX_TOLERANCE


@pytest.fixture(scope="module", params=BACKENDS)
def built(request, eager):
    """(backend name, its detections of the inputs, the cached files it built)."""
    cfg, model, inputs, _ = eager
    before = set(os.listdir(cfg.TEST.BACKEND.CACHE_DIR))
    outputs = build_inference_model(_with(cfg, "TEST.BACKEND.NAME", request.param), model)(inputs)
    files = sorted(set(os.listdir(cfg.TEST.BACKEND.CACHE_DIR)) - before)
    return request.param, [out["instances"] for out in outputs], files


def test_backend_gives_the_eager_detections_at_a_dynamic_and_a_fixed_size(eager, built):
    _, _, _, expected = eager
    _, got, files = built
    for e, g in zip(expected, got):
        assert_same_detections(e, g)
    assert len(files) == 2 and any("-dynamic" in f for f in files) and any("-128x128" in f for f in files), files


def test_a_second_run_loads_the_cached_programs(eager, built, caplog):
    cfg, model, inputs, expected = eager
    name, _, files = built
    with caplog.at_level(logging.INFO, logger="retina_focal.export.backends"):
        outputs = build_inference_model(_with(cfg, "TEST.BACKEND.NAME", name), model)(inputs)
    assert [m for m in caplog.messages if "built in" in m] == []
    assert sum("loading" in m for m in caplog.messages) == 2, caplog.messages
    for e, g in zip(expected, outputs):
        assert_same_detections(e, g["instances"])


def test_the_cache_key_follows_the_weights_and_the_config(eager):
    cfg, model, _, _ = eager
    key = network_key(cfg, model)
    assert network_key(cfg.clone(), model) == key
    assert network_key(_with(cfg, "MODEL.RETINANET.NUM_CONVS", 2), model) != key
    assert network_key(_with(cfg, "DATASETS.TRAIN", ("other",)), model) == key  # float32: no calibration
    int8 = _with(cfg, "TEST.BACKEND.INT8", True)
    assert network_key(_with(int8, "DATASETS.TRAIN", ("other",)), model) != network_key(int8, model) != key
    other = build_model(cfg).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.cls_score.bias.add_(1e-3)
    assert network_key(cfg, other) != key


def _network_outputs(model, network, image):
    """The logits and deltas of every level, flattened and concatenated (not the anchors)."""
    with torch.no_grad():
        outputs = network(padded_for_export(model, image[None]))
    return torch.cat([torch.as_tensor(x).flatten() for x in outputs[: 2 * len(outputs) // 3]])


def _convolution_dtypes(model, image):
    """The output dtypes of the convolutions of the program that the compiled backend builds
    (torch.export of the network on the padded ``image``; an autocast region is a nested graph)."""
    with torch.no_grad():
        program = torch.export.export(ExportableRetinaFocal(model), (padded_for_export(model, image[None]),))
    convolutions = (torch.ops.aten.convolution.default, torch.ops.aten.conv2d.default)
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    return {n.meta["val"].dtype for g in graphs for n in g.nodes if n.op == "call_function" and n.target in convolutions}


def test_compiled_runs_under_test_amp(eager, tmp_path):
    """TEST.AMP bfloat16 is compiled into the program: its convolutions run in bfloat16, and its
    logits and deltas are the eager bfloat16 model's within bfloat16 rounding. Not compared with
    float32 (where bfloat16 is emulated, AVX2, compiled and eager bfloat16 agree much more closely
    than either agrees with float32; with AMX kernels they differ by about as much as each differs
    from float32, 0.035 and 0.041 on the demo-size model)."""
    cfg, model, inputs, _ = eager
    amp_cfg = _with(cfg, "TEST.AMP.ENABLED", True, "TEST.AMP.PRECISION", "bfloat16", "TEST.BACKEND.NAME", "compiled",
                    "TEST.BACKEND.CACHE_DIR", str(tmp_path))
    amp_model = build_model(amp_cfg).eval()
    amp_model.load_state_dict(model.state_dict())
    image = inputs[1]["image"]
    assert _convolution_dtypes(amp_model, image) == {torch.bfloat16}
    assert _convolution_dtypes(model, image) == {torch.float32}  # the check can fail
    compiled = _network_outputs(amp_model, build_inference_model(amp_cfg, amp_model).network, image)
    eager_bf16 = _network_outputs(amp_model, ExportableRetinaFocal(amp_model), image)
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4 %); through ~25 layers the
    # roundings of two kernel sets add up to a few steps of the largest output.
    tolerance = 8 * 2.0**-8 * eager_bf16.abs().max()
    difference = (compiled - eager_bf16).abs().max()
    print(f"\ncompiled bfloat16 vs eager bfloat16 {difference:.3g} (tolerance {tolerance:.3g})")
    assert difference <= tolerance


def _int8_cfg(backend, cache, *opts):
    """A 128-px model (fixed-size programs) on ``backend`` in float32, calibrated (for int8) on 8
    images of the tiny shapes training set."""
    register_builtin_shapes()
    return small_cfg(*OPTS, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128, "TEST.BACKEND.NAME", backend,
                     "TEST.BACKEND.CACHE_DIR", cache, "DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",),
                     "TEST.BACKEND.CALIBRATION_IMAGES", 8, *opts)


@pytest.fixture(scope="module", params=["onnxruntime", "compiled"])
def int8(request, tmp_path_factory):
    """(backend, model, a validation image, the float32 and int8 networks, the cache folder)."""
    if request.param == "compiled":
        pytest.importorskip("torchao")
    cache = str(tmp_path_factory.mktemp("int8_cache"))
    cfg = _int8_cfg(request.param, cache)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = DatasetMapper(cfg, is_train=False)(DatasetCatalog.get("retina_focal_shapes_tiny_val")[0])["image"].float()
    with torch.no_grad():
        make_detections_nontrivial(model, [{"image": image}])
    float32 = build_inference_model(cfg, model).network
    quantized = build_inference_model(_with(cfg, "TEST.BACKEND.INT8", True), model).network
    _network_outputs(model, quantized, image)  # built (and cached) now, whichever test runs first
    return request.param, model, image, float32, quantized, cache


def _assert_int8_program(backend, cache, quantized, model, image):
    """What was cached holds int8 weights for the convolutions; for compiled, the calls that run
    are oneDNN's int8 convolutions, and no float32 one is left."""
    if backend == "onnxruntime":
        (path,) = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-int8.onnx")]
        graph = onnx.load(path).graph
        assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
        int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        convs = [node for node in graph.node if node.op_type == "Conv"]
        assert len(int8_weights) >= 20 and all(node.input[1].endswith("_DequantizeLinear_Output") for node in convs)
        return
    (path,) = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith("-int8.pt2")]
    program = load_int8(path)
    int8_weights = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    int8_weights += [t for t in program.constants.values() if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    assert len(int8_weights) >= 20
    with torch.profiler.profile() as profile:
        _network_outputs(model, quantized, image)
    ops = {event.key for event in profile.key_averages()}
    assert {"onednn::qconv_pointwise", "onednn::qconv2d_pointwise"} & ops, sorted(ops)
    assert not {"aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::convolution"} & ops, sorted(ops)


def test_int8_is_quantized_from_the_training_images_and_stays_near_float32(int8):
    backend, model, image, float32, quantized, cache = int8
    reference, got = _network_outputs(model, float32, image), _network_outputs(model, quantized, image)
    _assert_int8_program(backend, cache, quantized, model, image)
    error = float((got - reference).abs().max() / reference.abs().max())
    print(f"\n{backend} int8 vs float32: max abs difference of logits and deltas / their max abs {error:.3g}")
    assert 0 < error < 0.1


def test_a_second_int8_run_loads_without_calibrating(int8, caplog):
    backend, model, image, _, quantized, cache = int8
    cfg = _int8_cfg(backend, cache, "TEST.BACKEND.INT8", True)
    with caplog.at_level(logging.INFO, logger="retina_focal.export"):
        again = _network_outputs(model, build_inference_model(cfg, model).network, image)
    assert not [m for m in caplog.messages if "calibration" in m or "built in" in m], caplog.messages
    assert torch.equal(again, _network_outputs(model, quantized, image))


def test_auto_on_this_cpu_runs_what_it_chose(int8, caplog):
    """The real CPU's flags: auto logs its choice and the network is that choice's (its
    outputs equal those of the backend and precision named explicitly)."""
    backend, model, image, float32, quantized, cache = int8
    cfg = _int8_cfg("auto", cache)
    with caplog.at_level(logging.INFO, logger="retina_focal.export.backends"):
        chosen = resolve_auto_backend(cfg)
        network = build_inference_model(cfg, model).network
    (line,) = [m for m in caplog.messages if m.startswith("TEST.BACKEND.NAME auto:")][:1]
    assert chosen.TEST.BACKEND.NAME in line and chosen.TEST.BACKEND.NAME in ("compiled", "onnxruntime")
    if (chosen.TEST.BACKEND.NAME, chosen.TEST.BACKEND.INT8) != (backend, True):
        pytest.skip(f"auto chose {line}; this case checks {backend} int8")
    assert torch.equal(_network_outputs(model, network, image), _network_outputs(model, quantized, image))


@pytest.mark.parametrize(
    "opts, message",
    [
        (["TEST.BACKEND.NAME", "tensorrt"], r"TEST.BACKEND.NAME must be one of \['eager', 'auto', 'compiled', 'onnxruntime'\]"),
        (["TEST.BACKEND.INT8", True], "TEST.BACKEND.INT8 True needs TEST.BACKEND.NAME compiled or onnxruntime, got 'eager'"),
        (["TEST.BACKEND.NAME", "compiled", "TEST.BACKEND.INT8", True, "TEST.AMP.ENABLED", True],
         "TEST.BACKEND.INT8 and TEST.AMP.ENABLED are two precisions; turn one off"),
        (["TEST.BACKEND.NAME", "onnxruntime", "TEST.AMP.ENABLED", True], "TEST.AMP.ENABLED is for the PyTorch backends"),
        (["TEST.BACKEND.NAME", "onnxruntime", "TEST.BACKEND.INT8", True, "TEST.BACKEND.CALIBRATION_IMAGES", 0],
         "TEST.BACKEND.CALIBRATION_IMAGES must be >= 1"),
        (["TEST.BACKEND.NAME", "onnxruntime", "TEST.BACKEND.INT8", True, "DATASETS.TRAIN", ()],
         "TEST.BACKEND.INT8 calibrates on the images of DATASETS.TRAIN, which is empty"),
        (["TEST.BACKEND.NAME", "compiled", "MODEL.DEVICE", "cuda"], "TEST.BACKEND.NAME compiled runs on the CPU; with MODEL.DEVICE cuda use eager"),
    ],
)
def test_settings_that_fit_nothing_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        check_backend_settings(small_cfg(*opts))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """config.yaml and model.pth of a 128-px model with detections, and 3 images."""
    root = tmp_path_factory.mktemp("backend_cli")
    cfg = small_cfg(*OPTS, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128, "OUTPUT_DIR", str(root / "run"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = _images(root / "images", 3)
    with torch.no_grad():
        make_detections_nontrivial(model, [{"image": torch.as_tensor(cv2.imread(p).transpose(2, 0, 1)).float()} for p in images])
    RetinaFocalCheckpointer(model, save_dir=str(root)).save("model")
    (root / "config.yaml").write_text(cfg.dump())
    return str(root / "config.yaml"), str(root / "model.pth"), str(root / "images"), root


def _images(folder, count):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [os.path.join(folder, f"img{i}.png") for i in range(count)]
    for path in paths:
        cv2.imwrite(path, rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    return paths


def _same_results(a, b) -> bool:
    """Each result of one is the other's (file, class, score within 1e-4, box within 1e-3 px)."""
    return matched_results_share(a, b, "file_name", SCORE_TOLERANCE, BOX_TOLERANCE) == 1.0 == \
        matched_results_share(b, a, "file_name", SCORE_TOLERANCE, BOX_TOLERANCE)


def _predict(config, weights, images, out, *extra):
    assert predict_main(["--config-file", config, "--input", images, "--output", str(out), "--confidence", "0.0",
                         *extra, "MODEL.WEIGHTS", weights]) == 0
    with open(os.path.join(str(out), "results.json")) as f:
        return sorted(json.load(f), key=lambda r: (r["file_name"], -r["score"]))


def test_predict_with_backend_writes_the_eager_results(saved):
    config, weights, images, root = saved
    eager, got = _predict(config, weights, images, root / "eager"), _predict(config, weights, images, root / "ort", "--backend", "onnxruntime")
    assert len(got) == len(eager) == 3 * 30
    assert _same_results(eager, got)
    assert any(f.endswith("-128x128-float32.onnx") for f in os.listdir(root / "run" / "inference_backend"))


def test_export_backend_builds_what_predict_then_loads(saved, capsys):
    config, weights, images, root = saved
    out = root / "deploy"
    assert export_main(["--backend", "onnxruntime", "--config-file", config, "--output", str(out),
                        "--sample-image", os.path.join(images, "img0.png"), "MODEL.WEIGHTS", weights]) == 0
    built = sorted(os.listdir(out))
    assert "config.yaml" in built and any(f.endswith("-128x128-float32.onnx") for f in built), built
    modified = {f: os.path.getmtime(out / f) for f in built}
    expected = _predict(config, weights, images, root / "eager_again")
    got = _predict(str(out / "config.yaml"), weights, images, root / "deployed")
    assert len(got) == len(expected) and _same_results(expected, got)
    assert sorted(os.listdir(out)) == built and all(os.path.getmtime(out / f) == t for f, t in modified.items())
    assert export_main(["--backend", "eager", "--config-file", config, "--output", str(root / "e"), "MODEL.WEIGHTS", weights]) == 2
    assert "--backend eager has nothing to build" in capsys.readouterr().err


def test_predict_names_a_backend_setting_that_fits_nothing(saved, capsys):
    config, weights, images, root = saved
    args = ["--config-file", config, "--input", images, "--output", str(root / "bad"), "--backend", "eager",
            "TEST.BACKEND.INT8", "True", "MODEL.WEIGHTS", weights]
    assert predict_main(args) == 2
    assert "error: TEST.BACKEND.INT8 True needs TEST.BACKEND.NAME compiled or onnxruntime, got 'eager'" in capsys.readouterr().err


def test_a_backend_that_cannot_build_is_one_error_not_a_build_per_image(saved, capsys, monkeypatch):
    """Without a C++ compiler, predict --backend compiled used to export and build again for
    each image (~3 min each) and report every image as failed (exit 1)."""
    config, weights, images, root = saved
    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("C++ compile error: g++ not found")

    monkeypatch.setattr(torch.export, "export", no_compiler)
    code = predict_main(["--config-file", config, "--input", images, "--output", str(root / "no_compiler"),
                         "--backend", "compiled", "TEST.BACKEND.CACHE_DIR", str(root / "empty_cache"), "MODEL.WEIGHTS", weights])
    err = capsys.readouterr().err
    assert code == 2 and len(calls) == 1
    assert "TEST.BACKEND.NAME compiled: the 128x128 program could not be built or loaded (RuntimeError: C++ compile error" in err
    assert "the model failed on it" not in err
