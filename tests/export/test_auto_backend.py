"""TEST.BACKEND.NAME auto (retina_focal/export/backends.py): the choice from the CPU's ISA flags,
faked both ways, is logged; a precision the config turns on itself is kept; other names are
left alone. (The choice run on the real CPU: tests/export/test_backends.py.)"""
import argparse
import logging

import pytest
import torch
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.export import backends
from retina_focal.export.backends import build_inference_model, choose_backend, resolve_auto_backend
from retina_focal.export.predictor import load_inference_model
from retina_focal.utils.cpu import int8_needs_reduced_range
from tests.conftest import small_cfg

AMX = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}  # no VNNI: bfloat16 but no int8 dot products
AVX2 = {"avx2", "fma"}
BOTH = {"torchao", "onnxruntime"}
INT8 = ["TEST.BACKEND.INT8", True]
BF16 = ["TEST.AMP.ENABLED", True, "TEST.AMP.PRECISION", "bfloat16"]


@pytest.mark.parametrize(
    "flags, installed, can_calibrate, expected",
    [
        (AMX, BOTH, True, ["TEST.BACKEND.NAME", "compiled", *INT8]),
        (AMX, BOTH, False, ["TEST.BACKEND.NAME", "compiled", *BF16]),  # no training images to calibrate on
        (AMX, {"onnxruntime"}, True, ["TEST.BACKEND.NAME", "compiled", *BF16]),  # no torchao
        (AVX512_BF16, BOTH, True, ["TEST.BACKEND.NAME", "compiled", *BF16]),
        (AVX2, BOTH, True, ["TEST.BACKEND.NAME", "onnxruntime", *INT8]),
        (AVX2, BOTH, False, ["TEST.BACKEND.NAME", "onnxruntime"]),
        (AVX2, set(), True, ["TEST.BACKEND.NAME", "compiled"]),
    ],
)
def test_the_choice_follows_the_isa_flags(flags, installed, can_calibrate, expected):
    opts, why = choose_backend(flags, installed, can_calibrate)
    assert opts == expected and why


@pytest.mark.parametrize("flags, expected", [
    (AMX, ["TEST.BACKEND.NAME", "compiled", *BF16]),
    (AVX2, ["TEST.BACKEND.NAME", "compiled"]),
])
def test_with_group_norm_int8_is_not_chosen(flags, expected):
    assert choose_backend(flags, BOTH, True, group_norm=True)[0] == expected


def test_a_gpu_stays_eager():
    assert choose_backend(AMX, BOTH, True, device_type="cuda")[0] == ["TEST.BACKEND.NAME", "eager"]


@pytest.mark.parametrize(
    "flags, precision_set, name",
    [(AMX, "int8", "compiled"), (AVX2, "int8", "onnxruntime"), (AVX2, "bfloat16", "compiled")],
)
def test_a_precision_the_config_sets_is_kept(flags, precision_set, name):
    assert choose_backend(flags, BOTH, True, precision_set=precision_set)[0] == ["TEST.BACKEND.NAME", name]


@pytest.mark.parametrize("flags, expected", [(AMX, ("compiled", True, False)), (AVX2, ("onnxruntime", True, False))])
def test_auto_merges_the_choice_for_the_flags_of_this_machine_and_logs_it(monkeypatch, caplog, flags, expected):
    monkeypatch.setattr(backends, "cpu_flags", lambda: flags)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())  # torchao and onnxruntime installed
    cfg = small_cfg("TEST.BACKEND.NAME", "auto", "DATASETS.TRAIN", ("some_train_set",), "MODEL.FPN.NORM", "",
                    "MODEL.RETINANET.NORM", "")
    with caplog.at_level(logging.INFO, logger="retina_focal.export.backends"):
        chosen = resolve_auto_backend(cfg)
    assert (chosen.TEST.BACKEND.NAME, chosen.TEST.BACKEND.INT8, chosen.TEST.AMP.ENABLED) == expected
    assert cfg.TEST.BACKEND.NAME == "auto"  # a copy
    (line,) = [m for m in caplog.messages if m.startswith("TEST.BACKEND.NAME auto:")]
    assert f"TEST.BACKEND.NAME {expected[0]} TEST.BACKEND.INT8 True" in line


def test_an_explicit_backend_is_left_alone(monkeypatch):
    monkeypatch.setattr(backends, "cpu_flags", lambda: AMX)
    cfg = small_cfg("TEST.BACKEND.NAME", "onnxruntime")
    assert resolve_auto_backend(cfg) is cfg


@pytest.mark.parametrize("flags, reduced", [(AMX, False), ({"avx2", "avx_vnni"}, False), (AVX2, True), (AVX512_BF16, True)])
def test_int8_weights_keep_7_bits_only_without_vnni(monkeypatch, flags, reduced):
    monkeypatch.setattr("retina_focal.utils.cpu.cpu_flags", lambda: flags)
    assert int8_needs_reduced_range() is reduced


@pytest.fixture
def bf16_only_cpu(monkeypatch):
    """A CPU with bfloat16 kernels and no VNNI, and a compiled backend that builds nothing."""
    monkeypatch.setattr(backends, "cpu_flags", lambda: AVX512_BF16)
    monkeypatch.setitem(backends.INFERENCE_BACKEND_REGISTRY._obj_map, "compiled", lambda cfg, model: "network")


def test_a_bfloat16_choice_reaches_the_model_built_for_it(bf16_only_cpu, tmp_path):
    """Through load_inference_model (predict, --eval-only): the model runs backbone and head in bfloat16."""
    cfg = small_cfg("TEST.BACKEND.NAME", "auto")
    torch.manual_seed(0)
    RetinaFocalCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    inference = load_inference_model(cfg, str(tmp_path / "model.pth"))
    assert inference.network == "network" and inference.model.inference_dtype == torch.bfloat16


def test_a_bfloat16_choice_reaches_a_model_built_before_it(bf16_only_cpu):
    cfg = small_cfg("TEST.BACKEND.NAME", "auto")
    model = build_model(cfg).eval()
    assert model.inference_dtype is None
    inference = build_inference_model(cfg, model)
    assert inference.network == "network" and model.inference_dtype == torch.bfloat16


@pytest.mark.parametrize("flag, opts", [
    ("compiled-int8", ["TEST.BACKEND.NAME", "compiled", "TEST.BACKEND.INT8", True]),
    ("onnxruntime-int8", ["TEST.BACKEND.NAME", "onnxruntime", "TEST.BACKEND.INT8", True]),
    ("auto", ["TEST.BACKEND.NAME", "auto"]),
])
def test_the_backend_flag_sets_the_keys(flag, opts):
    parser = argparse.ArgumentParser()
    backends.add_backend_argument(parser)
    assert backends.backend_opts(parser.parse_args(["--backend", flag])) == opts
    cfg = small_cfg(*opts)  # the keys merge into a config and fit together
    backends.check_backend_settings(cfg)
