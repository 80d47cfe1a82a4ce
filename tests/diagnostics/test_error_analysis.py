"""Error analysis on toy detections whose AP, confusion matrix and FP types are worked out by hand."""
import math

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from retina_focal.diagnostics import (
    coco_evaluation,
    confusion_table,
    detections_from_coco_results,
    ground_truth_boxes,
    match_detections,
    per_class_ap,
    precision_recall,
)

NAME = "retina_focal_toy_errors"
CAT, DOG = 0, 1  # contiguous ids; the dataset's own ids are 1 and 2, as in a COCO json

# image 1: cats A, B and dog C; image 2: one dog D
GT = {
    1: [([0, 0, 20, 20], CAT), ([50, 50, 70, 70], CAT), ([0, 50, 20, 70], DOG)],
    2: [([10, 10, 50, 50], DOG)],
}


def _xywh(x1, y1, x2, y2):
    return [x1, y1, x2 - x1, y2 - y1]


# (image, XYXY box, dataset category id, score)
DETECTIONS = [
    (1, [80, 0, 100, 20], 2, 0.95),  # dog on nothing: background FP
    (1, [0, 0, 20, 20], 1, 0.90),  # cat on A: TP
    (1, [0, 0, 20, 21], 1, 0.80),  # cat on A again (IoU 0.95): duplicate, localization FP
    (1, [50, 50, 70, 70], 1, 0.70),  # cat on B: TP
    (1, [0, 50, 20, 70], 1, 0.60),  # cat on dog C: confusion FP
    (1, [5, 5, 25, 25], 1, 0.30),  # cat near A (IoU 0.39): below the threshold of the matrix
    (2, [12, 12, 48, 48], 2, 0.40),  # dog on D (IoU 0.81): below the threshold, D is missed there
]


@pytest.fixture(scope="module")
def toy_dataset():
    dicts = [
        {
            "file_name": f"{i}.png", "image_id": i, "height": 100, "width": 100,
            "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0} for b, c in anns],
        }
        for i, anns in GT.items()
    ]
    DatasetCatalog.register(NAME, lambda: dicts)
    MetadataCatalog.get(NAME).set(thing_classes=["cat", "dog"], thing_dataset_id_to_contiguous_id={1: CAT, 2: DOG})
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


@pytest.fixture(scope="module")
def results():
    return [{"image_id": i, "bbox": _xywh(*b), "category_id": c, "score": s} for i, b, c, s in DETECTIONS]


def test_per_class_ap_by_hand_worst_first(toy_dataset, results):
    rows = per_class_ap(coco_evaluation(toy_dataset, results), ["cat", "dog"])
    # cat, at every IoU threshold: TP, FP, TP, FP, FP over 2 boxes -> interpolated precision
    # 1 for recall <= 0.5 (51 of COCO's 101 points) and 2/3 above (50 points)
    cat = (51 * 1 + 50 * 2 / 3) / 101 * 100
    # dog: FP (0.95) then TP at IoU 0.81 over 2 boxes: precision 1/2 up to recall 0.5 for the 7
    # thresholds 0.50..0.80, nothing for 0.85..0.95
    dog = 7 / 10 * (51 * 0.5 / 101) * 100
    assert [name for name, _ in rows] == ["dog", "cat"]
    assert rows[0][1] == pytest.approx(dog, abs=1e-6)
    assert rows[1][1] == pytest.approx(cat, abs=1e-6)


def test_precision_recall_curve_of_one_class(toy_dataset, results):
    recall, precision, overall = precision_recall(coco_evaluation(toy_dataset, results), 0.5)
    assert recall.shape == (101,) and precision.shape == (2, 101)
    np.testing.assert_allclose(precision[CAT, :51], 1.0)
    np.testing.assert_allclose(precision[CAT, 51:], 2 / 3)
    np.testing.assert_allclose(precision[DOG, :51], 0.5)
    assert np.isnan(precision[DOG, 51:]).all()  # recall above 0.5 is never reached
    # overall: the mean of the two classes, with COCOeval's zeros beyond the dog's recall
    np.testing.assert_allclose(overall, (np.r_[np.ones(51), np.full(50, 2 / 3)] + np.r_[np.full(51, 0.5), np.zeros(50)]) / 2)


def test_confusion_matrix_and_false_positive_types_by_hand(toy_dataset, results):
    summary = match_detections(
        ground_truth_boxes(toy_dataset), detections_from_coco_results(results, toy_dataset), 2, score_thresh=0.5
    )
    # rows: gt cat, gt dog, background; columns: det cat, det dog, missed
    expected = [
        [2, 0, 0],  # A and B detected as cats
        [1, 0, 1],  # C detected as a cat; D missed (its detection scores 0.4)
        [1, 1, 0],  # the duplicate cat and the dog on nothing
    ]
    np.testing.assert_array_equal(summary.confusion, expected)
    np.testing.assert_array_equal(summary.true_positives, [2, 0])
    # columns: localization, confusion, background
    np.testing.assert_array_equal(summary.fp_types, [[1, 1, 0], [0, 0, 1]])
    table = confusion_table(summary, ["cat", "dog"])
    assert "missed" in table and "localization" in table and "33.3%" in table


def test_detections_on_unknown_images_are_an_error(toy_dataset, results):
    bad = results + [{"image_id": 99, "bbox": [0, 0, 5, 5], "category_id": 1, "score": 0.9}]
    with pytest.raises(ValueError, match="not in the dataset"):
        match_detections(ground_truth_boxes(toy_dataset), detections_from_coco_results(bad, toy_dataset), 2, 0.5)


def test_class_without_ground_truth_sorts_last(toy_dataset, results):
    coco_eval = coco_evaluation(toy_dataset, results)
    coco_eval.eval["precision"][:, :, CAT] = -1  # as COCOeval leaves a class with no box
    rows = per_class_ap(coco_eval, ["cat", "dog"])
    assert rows[0][0] == "dog" and rows[1][0] == "cat" and math.isnan(rows[1][1])
