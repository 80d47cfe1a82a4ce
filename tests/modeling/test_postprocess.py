"""retina_focal/modeling/postprocess.py: the exactness of the fast post-processing (chunked
top-k, truncated NMS) including exact ties. (Its detections against the plain path, on a model:
tests/modeling/test_fast_layers.py.)"""
import pytest
import torch
from detectron2.structures import Boxes, pairwise_iou

from retina_focal.modeling.postprocess import InferenceSettings, chunked_topk, first_kept_by_nms



def _greedy_nms(boxes, scores, classes, thresh, agnostic, max_det):
    """Textbook greedy NMS: visit boxes by score (ties by index), keep a box unless a kept box
    of its class (any class if ``agnostic``) overlaps it by more than ``thresh``."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    kept = []
    for i in order:
        if all(iou[i, j] <= thresh or (not agnostic and classes[i] != classes[j]) for j in kept):
            kept.append(i)
        if len(kept) == max_det:
            break
    return torch.tensor(kept, dtype=torch.int64)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("num_boxes, max_det", [(3000, 100), (300, 100), (50, 100), (0, 100)])
def test_first_kept_by_nms_equals_greedy_nms_over_all_candidates(ties, agnostic, num_boxes, max_det):
    """Exact, also with exact score ties (scores from 4 values), which decide by input order."""
    g = torch.Generator().manual_seed(num_boxes)
    centers = torch.rand(max(num_boxes // 30, 1), 2, generator=g) * 200  # clusters: NMS suppresses most boxes
    xy = centers[torch.randint(len(centers), (num_boxes,), generator=g)] + torch.randn(num_boxes, 2, generator=g) * 4
    wh = 20 + torch.rand(num_boxes, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(4, (num_boxes,), generator=g).float() if ties else torch.randn(num_boxes, generator=g)
    classes = torch.randint(3, (num_boxes,), generator=g)
    settings = InferenceSettings(0.05, 1000, 0.5, max_det, agnostic)
    expected = _greedy_nms(boxes, scores, classes, 0.5, agnostic, max_det)
    assert torch.equal(first_kept_by_nms(boxes, scores, classes, settings), expected)


@pytest.mark.parametrize("n, k", [(2_000_003, 1000), (64_001, 1000), (5_000, 1000), (1000, 1000)])
def test_chunked_topk_equals_topk(n, k):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    top, idx = chunked_topk(values, k)
    expected_top, expected_idx = values.topk(k)
    assert torch.equal(top, expected_top) and torch.equal(idx, expected_idx)
