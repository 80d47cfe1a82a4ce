import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage

from retina_focal import RetinaFocal
from retina_focal.utils.testing import (
    build_detectron2_twin,
    make_detections_nontrivial,
    paired_detection_rows,
    random_images,
)
from tests.conftest import make_instances, small_cfg


def _train_inputs():
    images = random_images([(128, 128), (128, 128)])
    gts = [
        make_instances([[10, 12, 60, 70], [70, 20, 120, 50], [30, 80, 50, 100]], [0, 2, 1]),
        make_instances([[5, 5, 120, 110]], [1]),
    ]
    return [{"image": im, "instances": gt} for im, gt in zip(images, gts)]


def test_image_without_objects_is_all_background_and_trains():
    model = build_model(small_cfg())
    inputs = [{"image": random_images([(96, 128)])[0], "instances": make_instances([], [], (96, 128))}]
    with EventStorage():
        losses = model(inputs)
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
    # unit-std inputs keep a random (frozen-BN) ResNet's features in a trainable range;
    # a per-batch normalizer (momentum 0) keeps the loss scale fixed across steps
    model = build_model(
        small_cfg("MODEL.PIXEL_STD", [57.375, 57.12, 58.395], "MODEL.RETINA_FOCAL.LOSS_NORMALIZER_MOMENTUM", 0.0)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs = _train_inputs()
    totals = []
    with EventStorage():
        for _ in range(20):
            losses = model(inputs)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(total.item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert all(b < a for a, b in zip(totals, totals[1:])), totals  # falls at every step
    assert totals[-1] < 0.9 * totals[0], totals


def test_inference_limits_and_output_size():
    # prior 0.5: every anchor starts far above the 0.05 threshold, so the caps bind
    model = build_model(small_cfg("MODEL.RETINANET.PRIOR_PROB", 0.5)).eval()
    inputs = [{"image": im, "height": 300, "width": 150} for im in random_images([(128, 64), (96, 96)])]
    with torch.no_grad():
        outputs = model(inputs)
    for out, expected_size in zip(outputs, [(300, 150), (300, 150)]):
        inst = out["instances"]
        assert inst.image_size == expected_size
        assert 0 < len(inst) <= 100
        assert (inst.scores > 0.05).all()
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 150).all() and (b[:, 3] <= 300).all()


def parity_figures(cfg, tmp_path):
    """Save a detectron2 RetinaNet checkpoint, load it into RetinaFocal, compare detections."""
    inputs = [
        {"image": im, "height": h, "width": w}
        for im, (h, w) in zip(random_images([(256, 320), (192, 256)], seed=3), [(512, 640), (192, 256)])
    ]
    theirs = build_detectron2_twin(cfg).eval()
    make_detections_nontrivial(theirs, inputs)
    DetectionCheckpointer(theirs, save_dir=str(tmp_path)).save("d2_retinanet")
    path = str(tmp_path / "d2_retinanet.pth")

    ours = build_model(cfg).eval()
    assert isinstance(ours, RetinaFocal)
    DetectionCheckpointer(ours).load(path)
    ours.load_state_dict(torch.load(path)["model"], strict=True)  # no missing/unexpected keys

    with torch.no_grad():
        a, b = ours(inputs), theirs(inputs)
    score_diff, box_diff, count = 0.0, 0.0, 0
    for x, y in zip(a, b):
        x, y = paired_detection_rows(x["instances"], y["instances"])
        assert len(x) == len(y) and len(x) > 0
        assert torch.equal(x[:, 1], y[:, 1])  # classes
        score_diff = max(score_diff, (x[:, 0] - y[:, 0]).abs().max().item())
        box_diff = max(box_diff, (x[:, 2:] - y[:, 2:]).abs().max().item())
        count += len(x)
    return score_diff, box_diff, count


@pytest.mark.slow
@pytest.mark.parametrize("speed_ups", [True, False])
@pytest.mark.parametrize("depth, channels", [(18, 64), (50, 256)])
def test_detectron2_checkpoint_gives_the_same_detections(depth, channels, speed_ups, tmp_path):
    """Default (the speed transforms of retina_focal/modeling/fast_layers.py and FAST_POSTPROCESS): equal to float rounding. All
    off: bitwise, detectron2's computation step for step."""
    cfg = small_cfg(
        "MODEL.RESNETS.DEPTH", depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", channels,
        "MODEL.FPN.OUT_CHANNELS", 256,
        "MODEL.RETINANET.NUM_CLASSES", 80,
        "MODEL.RETINA_FOCAL.CHANNELS_LAST", speed_ups,
        "MODEL.RETINA_FOCAL.FOLD_FROZEN_BN", speed_ups,
        "MODEL.RETINA_FOCAL.FAST_POSTPROCESS", speed_ups,
    )
    score_diff, box_diff, count = parity_figures(cfg, tmp_path)
    print(f"parity R-{depth} (speed-ups {speed_ups}): {count} detections, max |score diff| {score_diff:.2e}, max |box diff| {box_diff:.2e} px")
    assert score_diff <= 1e-4 and box_diff <= 0.01
    if not speed_ups:
        assert score_diff == 0 and box_diff == 0


@pytest.mark.slow
def test_training_losses_equal_detectron2_on_the_same_batch():
    """Same weights, same batch (one image without objects): same loss_cls and loss_box_reg."""
    cfg = small_cfg("MODEL.PIXEL_STD", [57.375, 57.12, 58.395])
    theirs = build_detectron2_twin(cfg)
    ours = build_model(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    inputs = _train_inputs() + [{"image": random_images([(128, 128)], seed=5)[0], "instances": make_instances([], [])}]
    with EventStorage():
        for _ in range(2):  # twice: the running normalizer must evolve the same way
            a, b = ours(inputs), theirs(inputs)
            assert set(a) == set(b) == {"loss_cls", "loss_box_reg"}
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agnostic", [False, True])
def test_class_score_thresholds_and_class_agnostic_nms(agnostic):
    # prior 0.5: every score starts near 0.5; class 2's threshold lets no candidate through
    cfg = small_cfg(
        "MODEL.RETINANET.PRIOR_PROB", 0.5,
        "MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH", [0.2, 0.2, 0.9],
        "MODEL.RETINA_FOCAL.CLASS_AGNOSTIC_NMS", agnostic,
    )
    model = build_model(cfg).eval()
    images = model.preprocess_image([{"image": random_images([(128, 128)])[0]}])
    with torch.no_grad():
        (inst,) = model.inference(*model.predict(images), images.image_sizes)  # before clipping
    assert set(inst.pred_classes.tolist()) == {0, 1} and (inst.scores > 0.2).all()
    iou = pairwise_iou(inst.pred_boxes, inst.pred_boxes).fill_diagonal_(0)
    assert (iou <= 0.5).all() == agnostic  # class-wise NMS keeps overlapping boxes of two classes


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH", [0.1, 0.2]], r"CLASS_SCORE_THRESH must have one threshold per class \(MODEL.RETINANET.NUM_CLASSES = 3\), got 2"),
        (["MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH", [0.1, 0.2, 1.5]], r"CLASS_SCORE_THRESH must be in \[0, 1\)"),
        (["MODEL.RETINANET.SCORE_THRESH_TEST", -0.1], r"SCORE_THRESH_TEST must be in \[0, 1\), got -0.1"),
    ],
)
def test_bad_score_thresholds_name_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(small_cfg(*opts))
