"""Helpers shared by the tests and tools/benchmark.py: detectron2's own RetinaNet built from a
RetinaFocal config, synthetic batches, and weights that produce detections."""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

__all__ = [
    "build_detectron2_twin",
    "detection_rows",
    "make_detections_nontrivial",
    "matched_results_share",
    "paired_detection_rows",
    "random_images",
    "synthetic_batch",
]


def build_detectron2_twin(cfg) -> nn.Module:
    """detectron2's ``RetinaNet`` from the same config: only the three names that differ change.
    Its state dict has the same keys as RetinaFocal's."""
    d2 = cfg.clone()
    d2.defrost()
    d2.MODEL.META_ARCHITECTURE = "RetinaNet"
    d2.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    d2.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    return build_model(d2)


def random_images(sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[torch.Tensor]:
    """Uniform noise images (3, h, w) in [0, 255)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]


def synthetic_batch(batch_size: int, size: int, num_classes: int, boxes_per_image: int = 4, seed: int = 0) -> List[Dict]:
    """``batch_size`` square noise images of ``size`` px with ``boxes_per_image`` random boxes
    (8 % to 60 % of the side) of random classes each, in detectron2's input format."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for image in random_images([(size, size)] * batch_size, seed):
        wh = (torch.rand(boxes_per_image, 2, generator=g) * 0.52 + 0.08) * size
        x0y0 = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        gt = Instances(
            (size, size),
            gt_boxes=Boxes(torch.cat([x0y0, x0y0 + wh], dim=1)),
            gt_classes=torch.randint(num_classes, (boxes_per_image,), generator=g),
        )
        inputs.append({"image": image, "instances": gt})
    return inputs


@torch.no_grad()
def make_detections_nontrivial(model: nn.Module, inputs: List[Dict]) -> None:
    """The §4.1 init gives p ~ 0.01 everywhere (no detections): redraw the two output convs
    so that, on ``inputs``, logits have std 1 around σ^-1(0.1) and deltas std 0.2. Scores then
    stay below ~0.95, where float32 sigmoids of distinct logits rarely tie (near 1 they do,
    and which of two tied boxes an implementation keeps is arbitrary). Works on RetinaFocal
    and detectron2's RetinaNet (same module names)."""
    convs = {"cls_score": (model.head.cls_score, 1.0), "bbox_pred": (model.head.bbox_pred, 0.2)}
    for conv, _ in convs.values():
        conv.weight.normal_(0, 1)
        conv.bias.zero_()
    features = model.backbone(model.preprocess_image(inputs).tensor)
    logits, deltas = model.head([features[f] for f in model.head_in_features])
    for (conv, std), outs in zip(convs.values(), (logits, deltas)):
        conv.weight.mul_(std / torch.cat([o.flatten() for o in outs]).std())
    model.head.cls_score.bias.fill_(-2.2)


def detection_rows(instances: Instances) -> torch.Tensor:
    """(D, 6) [score, class, x0, y0, x1, y1] of one image's detections in a canonical order
    (lexicographic)."""
    rows = torch.cat([instances.scores[:, None], instances.pred_classes[:, None].float(), instances.pred_boxes.tensor], dim=1)
    for col in reversed(range(rows.shape[1])):  # stable sorts from the last key
        rows = rows[rows[:, col].argsort(stable=True)]
    return rows


def paired_detection_rows(a: Instances, b: Instances) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two implementations' detections of one image as (D, 6) rows (:func:`detection_rows`), b's
    reordered so that its row i is the detection nearest to a's row i: same class first, then
    the smallest score + box difference. Float rounding reorders detections whose scores
    (nearly) tie, so comparing sorted lists row by row would pair unrelated boxes.

    Returns:
        (Tensor, Tensor): a's rows; b's rows in the paired order (b's rows unchanged if the
        counts differ).
    """
    a_rows, b_rows = detection_rows(a), detection_rows(b)
    if len(a_rows) != len(b_rows) or len(a_rows) == 0:
        return a_rows, b_rows
    distance = (a_rows[:, None, :] - b_rows[None, :, :]).abs()  # (D, D, 6)
    cost = distance[..., 0] + distance[..., 2:].amax(dim=-1) + 1e9 * (distance[..., 1] > 0)  # (D, D)
    order = torch.full((len(a_rows),), -1, dtype=torch.int64)
    for flat in cost.flatten().argsort(stable=True).tolist():  # greedy, closest pairs first
        i, j = divmod(flat, len(b_rows))
        if order[i] < 0 and not (order == j).any():
            order[i] = j
    return a_rows, b_rows[order]


def matched_results_share(a: List[Dict], b: List[Dict], image_key: str, score_tol: float, box_tol: float) -> float:
    """The share of COCO-format results ``a`` that ``b`` has too: same ``image_key`` value and
    category, score within ``score_tol``, XYWH box within ``box_tol``. Robust to the order of
    near-tied scores (which :func:`paired_detection_rows` handles for ``Instances``)."""
    by_key: Dict[Tuple, List[Dict]] = {}
    for r in b:
        by_key.setdefault((r[image_key], r["category_id"]), []).append(r)

    def found(r: Dict) -> bool:
        return any(
            abs(r["score"] - o["score"]) < score_tol and max(abs(x - y) for x, y in zip(r["bbox"], o["bbox"])) < box_tol
            for o in by_key.get((r[image_key], r["category_id"]), [])
        )

    return sum(found(r) for r in a) / max(len(a), 1)
