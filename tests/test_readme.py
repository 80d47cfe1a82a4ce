"""The README's extension example registers a head that trains and predicts."""
import os
import re

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.conftest import REPO, make_instances, small_cfg


def _python_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_head_example_registers_and_runs():
    blocks = [b for b in _python_blocks() if "RETINA_FOCAL_HEAD_REGISTRY.register()" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    try:
        model = build_model(small_cfg("MODEL.RETINA_FOCAL.HEAD_NAME", "SharedTowerHead"))
        assert type(model.head).__name__ == "SharedTowerHead"
        inputs = [{"image": torch.rand(3, 96, 96) * 255, "instances": make_instances([[8, 8, 60, 50]], [1], (96, 96))}]
        with EventStorage():
            losses = model(inputs)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            assert "instances" in model(inputs)[0]
    finally:
        from retina_focal import RETINA_FOCAL_HEAD_REGISTRY

        RETINA_FOCAL_HEAD_REGISTRY._obj_map.pop("SharedTowerHead", None)
