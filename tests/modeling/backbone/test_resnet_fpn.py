import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import build_retinanet_resnet_fpn_backbone

from retina_focal.modeling.backbone.resnet_fpn import build_retina_focal_resnet_fpn_backbone
from tests.conftest import small_cfg

LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def _build(*opts):
    return build_retina_focal_resnet_fpn_backbone(small_cfg(*opts), ShapeSpec(channels=3))


@pytest.mark.parametrize("p6_from, p6_in_channels", [("res5", 512), ("p5", 64)])
def test_levels_strides_and_p6_source(p6_from, p6_in_channels):
    backbone = _build("MODEL.RETINA_FOCAL.P6_FROM", p6_from)
    shapes = backbone.output_shape()
    assert list(shapes) == LEVELS
    assert [shapes[k].stride for k in LEVELS] == [8, 16, 32, 64, 128]
    assert {shapes[k].channels for k in LEVELS} == {64}
    assert backbone.top_block.in_feature == p6_from
    assert backbone.top_block.p6.in_channels == p6_in_channels  # C5 of ResNet-18 has 512
    outputs = backbone(torch.zeros(1, 3, 256, 256))
    assert [tuple(outputs[k].shape[-2:]) for k in LEVELS] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.mark.parametrize("p6_from", ["res5", "p5"])
def test_p6_and_p7_are_computed_as_in_the_paper(p6_from):
    """P6 = conv3x3/2(C5) (or of P5), P7 = conv3x3/2(ReLU(P6)) (§4, footnote 2)."""
    backbone = _build("MODEL.RETINA_FOCAL.P6_FROM", p6_from).eval()
    x = torch.rand(1, 3, 128, 128)
    out = backbone(x)
    source = backbone.bottom_up(x)["res5"] if p6_from == "res5" else out["p5"]
    torch.testing.assert_close(out["p6"], backbone.top_block.p6(source))
    torch.testing.assert_close(out["p7"], backbone.top_block.p7(torch.relu(out["p6"])))
    assert backbone.top_block.p6.stride == (2, 2) and backbone.top_block.p6.kernel_size == (3, 3)


def test_parameter_names_equal_detectron2_retinanet_backbone():
    cfg = small_cfg()
    ours = build_retina_focal_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    theirs = build_retinanet_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize(
    "opts, key",
    [
        (["MODEL.RETINA_FOCAL.P6_FROM", "c4"], "P6_FROM"),
        (["MODEL.FPN.IN_FEATURES", ["res3", "res4", "res6"]], "MODEL.FPN.IN_FEATURES"),
    ],
)
def test_bad_backbone_settings_name_the_key(opts, key):
    with pytest.raises(ValueError, match=key):
        _build(*opts)


def test_an_fpn_input_the_bottom_up_network_lacks_is_an_error_naming_both_keys():
    with pytest.raises(ValueError, match=r"MODEL.FPN.IN_FEATURES names \['res9'\], which the bottom-up network "
                                         r"\(MODEL.RESNETS.OUT_FEATURES\) does not produce; it produces \['res3', 'res4', 'res5'\]"):
        _build("MODEL.FPN.IN_FEATURES", ["res3", "res9"])
