"""docs/extend.md: its code blocks run as written and build what they say."""
import os
import re

import pytest
import torch

from detectron2.modeling import BACKBONE_REGISTRY

from retina_focal import RETINA_FOCAL_HEAD_REGISTRY, RETINA_FOCAL_LOSS_REGISTRY, FocalLoss
from retina_focal.config import defaults

from tests.conftest import REPO


@pytest.fixture(scope="module")
def namespace():
    """Run the document's python blocks in order, in one namespace; unregister afterwards."""
    with open(os.path.join(REPO, "docs", "extend.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 4
    ns = {}
    try:
        exec(compile("".join(blocks), "docs/extend.md", "exec"), ns)
        yield ns
    finally:
        RETINA_FOCAL_HEAD_REGISTRY._obj_map.pop("ScaledDeltasHead", None)
        RETINA_FOCAL_LOSS_REGISTRY._obj_map.pop("Poly1FocalLoss", None)
        BACKBONE_REGISTRY._obj_map.pop("build_tiny_fpn_backbone", None)
        if "add_tiny_backbone_config" in ns:  # later configs must not get MODEL.TINY
            defaults._EXTENSIONS.remove(ns["add_tiny_backbone_config"])


def test_the_model_uses_the_new_head_and_loss_and_trains(namespace):
    model, losses = namespace["model"], namespace["losses"]
    assert type(model.head).__name__ == "ScaledDeltasHead" and type(model.cls_loss).__name__ == "Poly1FocalLoss"
    assert model.head.scales.shape == (5,)  # P3-P7
    assert model.head.scales.grad is not None and torch.isfinite(model.head.scales.grad).all()
    assert set(losses) == {"loss_cls", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())


def test_poly1_loss_against_the_formula_by_hand(namespace):
    poly = namespace["Poly1FocalLoss"](alpha=0.25, gamma=2.0, epsilon=0.5)
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(logits)
    p_t = torch.tensor([[p[0, 0], 1 - p[0, 1]]])
    alpha_t = torch.tensor([[0.25, 0.75]])
    by_hand = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t) + 0.5 * (1 - p_t) ** 3
    torch.testing.assert_close(poly.elementwise_loss(logits, targets), by_hand)
    zero = namespace["Poly1FocalLoss"](alpha=0.25, gamma=2.0, epsilon=0.0)
    focal = FocalLoss(alpha=0.25, gamma=2.0)
    torch.testing.assert_close(zero.elementwise_loss(logits, targets), focal.elementwise_loss(logits, targets))


def test_scaled_head_equals_the_plain_head_at_scale_one_and_scales_deltas(namespace):
    head = namespace["model"].head
    features = [torch.rand(1, 64, 8, 8), torch.rand(1, 64, 4, 4)]
    with torch.no_grad():
        head.scales.fill_(1.0)
        plain_logits, plain_deltas = super(type(head), head).forward(features)
        head.scales[1] = 3.0
        logits, deltas = head(features)
    torch.testing.assert_close(logits, plain_logits)
    torch.testing.assert_close(deltas[0], plain_deltas[0])
    torch.testing.assert_close(deltas[1], 3.0 * plain_deltas[1])


def test_the_backbone_brings_its_own_key_and_gives_p3_to_p7(namespace):
    tiny, cfg = namespace["tiny"], namespace["tiny_cfg"]
    assert cfg.MODEL.TINY.WIDTH == 16  # the extension's key, set by merge_from_list
    assert {k: v.stride for k, v in tiny.backbone.output_shape().items()} == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert tiny.backbone.bottom_up.stem.out_channels == 16
    with torch.no_grad():
        out = tiny.eval()([{"image": torch.rand(3, 128, 128) * 255}])
    assert len(out) == 1 and out[0]["instances"].image_size == (128, 128)
