"""retina_focal/modeling/tta.py (TEST.AUG.*): the scales and flips map back to the original image, one
scale without flip is the model itself, and predict / --eval-only use it when enabled."""
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from retina_focal.utils.testing import make_detections_nontrivial, paired_detection_rows, random_images
from retina_focal.modeling.tta import RetinaFocalWithTTA
from tests.conftest import small_cfg


class BrightSquareDetector(nn.Module):
    """A stand-in model with RetinaFocal's contract: detects the box of the pixels at 255 of
    its input image and returns it in the output pixels ("height", "width")."""

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            image = x["image"]
            ys, xs = torch.nonzero(image[0] >= 250, as_tuple=True)
            sx, sy = x["width"] / image.shape[2], x["height"] / image.shape[1]
            box = torch.tensor([[xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]])
            outputs.append({"instances": Instances((x["height"], x["width"]), pred_boxes=Boxes(box.float()),
                                                   scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))})
        return outputs


def test_every_scale_and_flip_maps_back_to_the_original_pixels():
    image = torch.zeros(3, 60, 100)
    image[:, 12:30, 10:34] = 255  # a bright box off-centre: a wrong un-flip would move it
    tta = RetinaFocalWithTTA(BrightSquareDetector(), min_sizes=(30, 60, 90), max_size=1000, flip=True,
                             nms_thresh=1.0, max_detections=100)
    (out,) = tta([{"image": image, "height": 60, "width": 100}])
    boxes = out["instances"].pred_boxes.tensor
    assert len(boxes) == 6  # 3 scales x 2, none suppressed at NMS 1.0
    torch.testing.assert_close(boxes, torch.tensor([[10.0, 12.0, 34.0, 30.0]]).expand(6, 4), atol=2.0, rtol=0)
    (merged,) = RetinaFocalWithTTA(BrightSquareDetector(), (30, 60, 90), 1000, True, 0.5, 100)(
        [{"image": image, "height": 60, "width": 100}]
    )
    assert len(merged["instances"]) == 1  # the same box six times: NMS keeps one


def test_one_scale_without_flip_is_the_model_itself():
    model = build_model(small_cfg("INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160)).eval()
    inputs = [{"image": im, "height": 96, "width": 128} for im in random_images([(96, 128)], seed=4)]
    make_detections_nontrivial(model, [{"image": x["image"]} for x in inputs])
    tta = RetinaFocalWithTTA(model, min_sizes=(96,), max_size=160, flip=False, nms_thresh=0.5, max_detections=100)
    with torch.no_grad():
        plain, augmented = model(inputs)[0]["instances"], tta([dict(x, image=x["image"].round()) for x in inputs])[0]["instances"]
        rounded = model([dict(x, image=x["image"].round()) for x in inputs])[0]["instances"]  # TTA works on uint8 pixels
    a, b = paired_detection_rows(rounded, augmented)
    assert len(a) == len(b) > 0 and torch.equal(a, b)
    assert len(plain) == len(rounded)


def test_config_keys_build_it():
    cfg = small_cfg("TEST.AUG.MIN_SIZES", (64, 96), "TEST.AUG.FLIP", False, "TEST.AUG.MAX_SIZE", 200)
    tta = RetinaFocalWithTTA.from_config(cfg, nn.Identity())
    assert (tta.min_sizes, tta.flip, tta.max_size, tta.nms_thresh, tta.max_detections) == ((64, 96), False, 200, 0.5, 100)
