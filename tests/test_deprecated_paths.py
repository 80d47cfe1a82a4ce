"""Import paths that users rely on (README and docs of the last release) keep working for one
release after the layout change, and give the same objects as the new paths."""
import importlib
import os

import pytest

from tests.conftest import REPO

# (old module, name, new module)
MOVED = [
    ("retina_focal.engine", "load_config", "retina_focal.config.load"),
    ("retina_focal.predict", "model_input", "retina_focal.export.predictor"),
    ("retina_focal.predict", "BatchPredictor", "retina_focal.export.predictor"),
    ("retina_focal.export", "padded_for_export", "retina_focal.export.torch_export"),
    ("retina_focal.export", "postprocess", "retina_focal.export.torch_export"),
    ("retina_focal.head", "conv_tower", "retina_focal.modeling.head"),
    ("retina_focal.head", "prior_bias", "retina_focal.modeling.head"),
    ("retina_focal.head", "RETINA_FOCAL_HEAD_REGISTRY", "retina_focal.modeling.head"),
    ("retina_focal.losses", "sigmoid_focal_loss", "retina_focal.modeling.losses"),
    ("retina_focal.losses", "focal_loss_sum", "retina_focal.modeling.losses"),
    ("retina_focal.losses", "FocalLoss", "retina_focal.modeling.losses"),
    ("retina_focal.losses", "RETINA_FOCAL_LOSS_REGISTRY", "retina_focal.modeling.losses"),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_path_gives_the_new_object(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", ["retina_focal.head", "retina_focal.losses"])
def test_shim_modules_say_they_are_deprecated(old):
    assert "Deprecated path" in importlib.import_module(old).__doc__


def test_the_lazy_model_config_keeps_its_path():
    assert os.path.isfile(os.path.join(REPO, "configs", "common", "models", "retina_focal.py"))
