import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage

from retina_focal import RETINA_FOCAL_HEAD_REGISTRY, RetinaFocalHead, RetinaFocalLightHead, build_retina_focal_head
from retina_focal.engine.trainer import RetinaFocalTrainer
from tests.conftest import make_instances, small_cfg


def test_paper_initialization():
    head = RetinaFocalHead(in_channels=256, num_anchors=9, num_classes=80)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 + 4 + 2
    for conv in convs:  # §4.1: Gaussian weights with sigma = 0.01
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert conv.weight.mean().abs().item() < 1e-3
    for conv in convs[:-2] + [head.bbox_pred]:
        assert torch.count_nonzero(conv.bias) == 0
    # b = -log((1 - pi) / pi) with pi = 0.01, i.e. -log(99)
    torch.testing.assert_close(head.cls_score.bias, torch.full((720,), -math.log(99.0)))


def test_initial_foreground_probability_is_the_prior():
    head = RetinaFocalHead(in_channels=64, num_anchors=9, num_classes=4, prior_prob=0.01)
    logits, _ = head([torch.randn(2, 64, 16, 16)])
    p = logits[0].sigmoid()
    assert p.mean().item() == pytest.approx(0.01, rel=0.05)
    assert p.max().item() < 0.02


@pytest.mark.parametrize("num_convs, norm", [(4, ""), (2, ""), (0, ""), (4, "GN")])
def test_output_shapes_per_level_and_shared_weights(num_convs, norm):
    head = RetinaFocalHead(in_channels=32, num_anchors=9, num_classes=5, num_convs=num_convs, norm=norm)
    feats = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2, 1)]
    logits, deltas = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 45, s, s) for s in (16, 8, 4, 2, 1)]
    assert [tuple(x.shape) for x in deltas] == [(2, 36, s, s) for s in (16, 8, 4, 2, 1)]
    convs_per_tower = sum(isinstance(m, torch.nn.Conv2d) for m in head.cls_subnet)
    assert convs_per_tower == num_convs
    # one set of weights serves every level (§4: "parameters of this subnet are shared across
    # all pyramid levels"): each level's output is the head applied to that level alone ...
    for i, f in enumerate(feats):
        alone_logits, alone_deltas = head([f])
        torch.testing.assert_close(alone_logits[0], logits[i], rtol=0, atol=0)
        torch.testing.assert_close(alone_deltas[0], deltas[i], rtol=0, atol=0)
    # ... and every level's loss reaches every weight of both subnets (but a 1x1 level under
    # GroupNorm, whose normalized output is its bias: its upstream gradient is 0)
    for i in [i for i, f in enumerate(feats) if not (norm and f.shape[-1] == 1)]:
        head.zero_grad()
        logits, deltas = head(feats)
        (logits[i].square().sum() + deltas[i].square().sum()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), i


def test_layer_names_equal_detectron2_head():
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    cfg = small_cfg()
    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16, 32, 64, 128)]
    ours, theirs = RetinaFocalHead(cfg, shapes), RetinaNetHead(cfg, shapes)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_head_is_chosen_by_config_and_unknown_names_are_listed():
    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16, 32, 64, 128)]
    assert isinstance(build_retina_focal_head(small_cfg(), shapes), RetinaFocalHead)
    with pytest.raises(KeyError, match="RetinaFocalHead"):
        build_retina_focal_head(small_cfg("MODEL.RETINA_FOCAL.HEAD_NAME", "NoSuchHead"), shapes)
    assert "RetinaFocalHead" in RETINA_FOCAL_HEAD_REGISTRY


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_batch_norm_in_the_shared_head_is_rejected(norm):
    with pytest.raises(ValueError, match="MODEL.RETINANET.NORM"):
        RetinaFocalHead(in_channels=32, num_anchors=9, num_classes=5, norm=norm)


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1])
def test_prior_outside_open_unit_interval_is_rejected(prior):
    with pytest.raises(ValueError, match="PRIOR_PROB"):
        RetinaFocalHead(in_channels=8, num_anchors=1, num_classes=1, prior_prob=prior)


def test_light_head_is_selected_by_config_and_is_cheaper():
    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16, 32, 64, 128)]
    cfg = small_cfg("MODEL.RETINA_FOCAL.HEAD_NAME", "RetinaFocalLightHead",
                    "MODEL.RETINA_FOCAL.LIGHT_HEAD.CHANNELS", 32, "MODEL.RETINA_FOCAL.LIGHT_HEAD.NUM_CONVS", 2)
    light = build_retina_focal_head(cfg, shapes)
    paper = build_retina_focal_head(small_cfg(), shapes)
    assert isinstance(light, RetinaFocalLightHead)
    logits, deltas = light([torch.zeros(2, 64, 8, 8), torch.zeros(2, 64, 4, 4)])
    assert [x.shape for x in logits] == [(2, 27, 8, 8), (2, 27, 4, 4)]  # A = 9, K = 3
    assert [x.shape for x in deltas] == [(2, 36, 8, 8), (2, 36, 4, 4)]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(light) < count(paper) / 3
    assert torch.allclose(torch.sigmoid(light.cls_score.bias), torch.tensor(0.01))


@pytest.mark.parametrize("head", ["RetinaFocalHead", "RetinaFocalLightHead"])
@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou", "diou", "ciou"])
def test_every_head_trains_with_every_box_loss(head, box_loss):
    cfg = small_cfg("MODEL.RETINA_FOCAL.HEAD_NAME", head, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_loss)
    model = RetinaFocalTrainer.build_model(cfg)
    batch = [{"image": torch.rand(3, 96, 128) * 255, "instances": make_instances([[10, 12, 60, 70]], [1], (96, 128))}]
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    assert all(math.isfinite(float(v.detach())) for v in losses.values()) and losses["loss_box_reg"] > 0
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
