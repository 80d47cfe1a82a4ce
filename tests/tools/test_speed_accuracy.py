"""tools/speed_accuracy.py: one point per model, test size and precision, AP from COCOEvaluator
at that size, a timed-only model drawn without AP; a real PNG and its table."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.config.load import load_config
from retina_focal.data import register_builtin_shapes
from tests.conftest import REPO

from tools import speed_accuracy

DEMO = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")


def test_parse_model_takes_label_config_and_optional_weights():
    assert speed_accuracy.parse_model("R-18=a.yaml:w.pth") == ("R-18", "a.yaml", "w.pth")
    assert speed_accuracy.parse_model("R-50=b.yaml") == ("R-50", "b.yaml", None)
    with pytest.raises(Exception, match="expected LABEL=CONFIG"):
        speed_accuracy.parse_model("b.yaml")


def test_points_per_size_and_precision_with_ap_where_there_are_weights(tmp_path, monkeypatch):
    register_builtin_shapes()
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, ["MODEL.DEVICE", "cpu"]))
    RetinaFocalCheckpointer(model, save_dir=str(tmp_path)).save("demo")
    monkeypatch.setattr(speed_accuracy, "cpu_has_bf16_kernels", lambda: False)  # float32 only, on every CPU
    out = str(tmp_path / "fig.png")
    assert speed_accuracy.main([
        "--model", f"R-18={DEMO}:{tmp_path / 'demo.pth'}",
        "--model", f"timed={DEMO}",
        "--sizes", "64", "96", "--dataset", "retina_focal_shapes_tiny_val", "--timed-images", "2", "--output", out,
    ]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = open(out[:-4] + ".md").read().splitlines()
    points = [r for r in rows if r.startswith("| R-18") or r.startswith("| timed")]
    assert [r.split("|")[2].strip() for r in points] == ["64", "96", "64", "96"]
    assert all(r.split("|")[3].strip() == "eager float32" for r in points)
    assert all(r.endswith("| time only |") for r in points[2:]) and not any("time only" in r for r in points[:2])


def test_the_picture_draws_eager_float32_and_the_fastest_other_run():
    def row(model, run, size, ms, ap):
        return {"model": model, "run": run, "size": size, "ms": ms, "AP": ap}

    rows = [row("A", "eager float32", 96, 10, 40), row("A", "eager float32", 128, 20, 50),
            row("A", "compiled float32", 96, 6, 40), row("A", "compiled float32", 128, 30, 50),  # total 36
            row("A", "compiled bfloat16", 96, 8, 40), row("A", "compiled bfloat16", 128, 12, 50),  # total 20: fastest
            row("B", "eager float32", 96, 50, None), row("B", "compiled bfloat16", 96, 20, None)]
    assert speed_accuracy.plotted_runs(rows) == [("A", "eager float32"), ("A", "compiled bfloat16"), ("B", "compiled bfloat16")]
