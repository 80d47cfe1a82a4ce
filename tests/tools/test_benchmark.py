"""tools/benchmark.py end to end on a tiny model: every section writes its rows."""
import csv

import pytest

from tools import benchmark

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64"]
VARIANT = "MODEL.RETINA_FOCAL.CHANNELS_LAST False"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    text = benchmark.main([
        "--device", "cpu", "--threads", "1", "--rounds", "1", "--scaling-rounds", "1", "--train-size", "64",
        "--train-batch", "1", "--sizes", "64", "--batches", "1", "--loss-anchors", "3000",
        "--backend-sizes", "128", "--calibration-images", "4", "--amp", "on", "--output-dir", str(out),
        "--variant", VARIANT, *TINY,
    ])
    assert "| section | case |" in text and (out / "results.md").read_text() == text
    assert "avx512_bf16" in text and "amx_bf16" in text and "torch CPU capability" in text  # the CPU's flags
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _rows(rows, section):
    return [r for r in rows if r["section"] == section]


def test_every_section_races_both_implementations(rows):
    both = {benchmark.OURS, benchmark.THEIRS}
    assert {r["implementation"] for r in _rows(rows, "memory")} == both
    variant = {f"{benchmark.OURS} [{VARIANT}]"}  # --variant races where the models are built in-process
    assert {r["implementation"] for r in _rows(rows, "scaling") if r["peak_mib"] == ""} == both | variant
    assert {r["implementation"] for r in _rows(rows, "scaling") if r["peak_mib"] != ""} == both  # memory: fresh processes
    # + the opt-in mixed precision, end to end; + the EMA update; + the --variant keys
    amp, ema = {benchmark.OURS_AMP}, {benchmark.OURS_EMA}
    assert {r["implementation"] for r in _rows(rows, "train")} == both | amp | ema | variant
    assert {r["implementation"] for r in _rows(rows, "inference") if r["case"].startswith("end to end")} == both | amp | variant
    backends = {f"{benchmark.OURS} {b}" for b in ("eager", "compiled", "onnxruntime", "onnxruntime int8", "compiled int8")}
    backends |= {f"{benchmark.OURS} {b} bfloat16" for b in ("eager", "compiled")}
    assert {r["implementation"] for r in _rows(rows, "backends")} == {benchmark.THEIRS} | backends
    cases = {r["case"] for r in _rows(rows, "inference")}
    assert {c.split(",")[0] for c in cases} == {"end to end", "backbone + FPN", "head", "post-processing"}
    for r in rows:
        assert float(r["ratio"]) > 0
        if r["implementation"] == benchmark.THEIRS:
            assert float(r["ratio"]) == 1.0  # detectron2 is the reference of every row pair


def test_loss_rows_check_values_against_fvcore(rows):
    loss = {r["implementation"]: r for r in _rows(rows, "loss")}
    assert len(loss) == 4 and float(loss["fvcore sigmoid_focal_loss_jit"]["ratio"]) == 1.0
    note = loss["ours FocalLoss (fused)"]["note"]
    value_diff, grad_diff = (float(part.split()[-1]) for part in note.split(", "))
    assert value_diff < 1e-5 and grad_diff < 1e-5


def test_inference_gives_the_same_detections(rows):
    (end_to_end,) = [
        r for r in _rows(rows, "inference") if r["case"].startswith("end to end") and r["implementation"] == benchmark.OURS
    ]
    assert "same classes" in end_to_end["note"] and not end_to_end["note"].startswith("0 detections")


def test_float32_backends_give_detectron2s_detections(rows):
    for r in _rows(rows, "backends"):
        if r["implementation"].split()[-1] in ("eager", "compiled", "onnxruntime"):
            assert "same classes" in r["note"] and "first call" in r["note"] and not r["note"].startswith("0 detections"), r


def test_memory_rows_have_peaks(rows):
    for r in _rows(rows, "memory") + [r for r in _rows(rows, "scaling") if r["peak_mib"]]:
        assert float(r["peak_mib"]) > 0
