"""retina_focal/utils/visualize.py: the demo's pictures feed the model its INPUT.FORMAT."""
import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from retina_focal.utils.visualize import draw_predictions


@pytest.mark.parametrize("input_format, first_channel", [("BGR", 0.0), ("RGB", 255.0)])
def test_the_model_gets_its_input_format(tmp_path, input_format, first_channel):
    path = str(tmp_path / "red.png")
    cv2.imwrite(path, np.dstack([np.zeros((8, 8)), np.zeros((8, 8)), np.full((8, 8), 255)]).astype(np.uint8))  # BGR: red
    name = f"visualize_red_{input_format}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": path, "image_id": 0, "height": 8, "width": 8, "annotations": []}])
        MetadataCatalog.get(name).set(thing_classes=["a"])
    seen = []

    def model(inputs):
        seen.append(inputs[0]["image"])
        return [{"instances": Instances((8, 8), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                                        pred_classes=torch.zeros(0, dtype=torch.int64))}]

    (picture,) = draw_predictions(model, name, str(tmp_path / "out"), indices=[0], input_format=input_format)
    assert float(seen[0][0].mean()) == first_channel  # channel 0 is red only for an RGB model
    assert cv2.imread(picture)[4, 4].tolist() == [0, 0, 255]  # the picture is red either way
