"""The speed transforms (retina_focal/modeling/fast_layers.py and ``FAST_POSTPROCESS``), each
against the plain path on a model; every speed key can be turned off."""
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model

from retina_focal.modeling.fast_layers import FrozenBNFoldedConv2d, channels_last_by_default, fold_frozen_batchnorm
from retina_focal.modeling.postprocess import InferenceSettings
from retina_focal.utils.testing import make_detections_nontrivial, paired_detection_rows, random_images, synthetic_batch
from tests.conftest import small_cfg

SPEED_KEYS = ("MODEL.RETINA_FOCAL.FOLD_FROZEN_BN", "MODEL.RETINA_FOCAL.CHANNELS_LAST", "MODEL.RETINA_FOCAL.FAST_POSTPROCESS")
STD_INPUTS = ["MODEL.PIXEL_STD", [57.375, 57.12, 58.395]]


def _randomized_frozen_bn(module):
    for bn in module.modules():
        if isinstance(bn, FrozenBatchNorm2d):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)


def test_folded_frozen_batchnorm_equals_conv_then_bn_and_keeps_parameters_and_keys():
    """FOLD_FROZEN_BN: same outputs and weight gradients as detectron2's conv + FrozenBN; the
    folded convs are new modules holding the very same Parameters (no __class__ swap)."""
    torch.manual_seed(0)
    cfg = small_cfg("MODEL.BACKBONE.FREEZE_AT", 0)
    plain = build_backbone(cfg)
    _randomized_frozen_bn(plain)
    folded = build_backbone(cfg)
    folded.load_state_dict(plain.state_dict())
    weight = folded.bottom_up.res3[0].conv1.weight
    assert fold_frozen_batchnorm(folded) == {"detectron2 Conv2d with FrozenBN": 20, "nn.Conv2d + FrozenBN": 0}  # stem, 16 block convs, 3 shortcuts
    conv = folded.bottom_up.res3[0].conv1
    assert type(conv) is FrozenBNFoldedConv2d and conv.weight is weight
    assert type(plain.bottom_up.res3[0].conv1) is Conv2d  # the class itself is untouched
    assert plain.state_dict().keys() == folded.state_dict().keys()
    x = torch.randn(2, 3, 96, 128)
    out_plain, out_folded = plain(x), folded(x)
    for k in out_plain:
        torch.testing.assert_close(out_folded[k], out_plain[k], rtol=1e-4, atol=1e-4)
    sum(o.square().sum() for o in out_plain.values()).backward()
    sum(o.square().sum() for o in out_folded.values()).backward()
    g_plain, g_folded = plain.bottom_up.res3[0].conv1.weight.grad, weight.grad
    torch.testing.assert_close(g_folded, g_plain, rtol=1e-3, atol=1e-3 * g_plain.abs().max().item())


def _pair(**on):
    """(plain model, model with the transforms in ``on``), same weights, eval mode."""
    off = [v for key in SPEED_KEYS for v in (key, False)]
    plain = build_model(small_cfg(*STD_INPUTS, *off))
    fast = build_model(small_cfg(*STD_INPUTS, *off, *[v for key, val in on.items() for v in (key, val)]))
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def test_channels_last_runs_nhwc_and_equals_the_plain_model():
    plain, fast = _pair(**{"MODEL.RETINA_FOCAL.CHANNELS_LAST": True})
    formats = []
    fast.backbone.bottom_up.stem.conv1.register_forward_hook(
        lambda _m, args, _out: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    inputs = synthetic_batch(2, 96, 3)
    with torch.no_grad():
        (_, la, da), (_, lb, db) = (m.predict(m.preprocess_image(inputs)) for m in (plain, fast))
    assert formats == [True] and fast.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)
    for x, y in zip(la + da, lb + db):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("agnostic", [False, True])
def test_fast_postprocess_gives_the_plain_paths_detections(agnostic):
    plain, fast = _pair(**{"MODEL.RETINA_FOCAL.FAST_POSTPROCESS": True})
    for m in (plain, fast):
        m.inference_settings = InferenceSettings(0.05, 1000, 0.5, 100, agnostic)
    images = [{"image": im} for im in random_images([(128, 160), (96, 128)], seed=2)]
    make_detections_nontrivial(plain.eval(), images)
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for a, b in zip(plain(images), fast.eval()(images)):
            x, y = paired_detection_rows(a["instances"], b["instances"])
            assert len(x) == len(y) > 0 and torch.equal(x[:, 1], y[:, 1])
            assert (x - y).abs().max() <= 1e-6


def test_every_speed_key_can_be_turned_off():
    off = build_model(small_cfg(*[v for key in SPEED_KEYS for v in (key, False)]))
    assert not any(isinstance(m, FrozenBNFoldedConv2d) for m in off.modules())
    assert not off.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)
    assert off.fast_postprocess is False and not off.backbone._forward_pre_hooks


@pytest.mark.parametrize("capability, device, expected", [
    ("AVX2", "cpu", False),  # measured slower there (docs/benchmark.md)
    ("AVX512", "cpu", True),
    ("AVX2", "cuda", True),
])
def test_channels_last_left_at_none_follows_the_cpu(monkeypatch, capability, device, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert channels_last_by_default(device) is expected
    if device == "cpu":  # the model built from the default config has (or not) channels-last weights
        model = build_model(small_cfg())
        assert model.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last) is expected
        forced = build_model(small_cfg("MODEL.RETINA_FOCAL.CHANNELS_LAST", not expected))  # an explicit value wins
        assert forced.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last) is (not expected)
