"""COCOEvaluator that says why AP is NaN, and one that computes AP with faster-coco-eval.

detectron2's COCOEvaluator (0.7, official pycocotools) handles the two degenerate cases
without an exception, but without saying why either:

- the model produced no detection: it warns "No predictions from the model!" and returns
  NaN for every metric;
- the evaluated images have no ground-truth box: pycocotools prints -1 everywhere and
  detectron2 turns that into NaN. If the dataset was registered as detectron2 dicts (no
  ``json_file``), it is worse: ``convert_to_coco_json`` leaves out the empty "annotations"
  key, COCOEvaluator then takes the dataset for an unlabelled test split, logs "Annotations
  are not available for evaluation." and returns ``{}``.

:class:`RetinaFocalCOCOEvaluator` returns exactly what COCOEvaluator returns (same dict, same
``coco_instances_results.json``), NaN metrics instead of ``{}`` in the last case, and logs a
note that names the dataset, the number of evaluated images and what to do.

Without detectron2's compiled ``_C``, COCOEvaluator computes AP with pycocotools' Python
COCOeval (minutes on COCO val). :class:`RetinaFocalFastCOCOEvaluator` (``TEST.EVALUATOR
faster_coco_eval``) does the same with the C++ ``COCOeval_faster`` of the faster-coco-eval
package; :func:`evaluator_class` maps ``TEST.EVALUATOR`` to the class.
"""
import contextlib
import io
import logging
from typing import AbstractSet, Dict, List, Optional

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation

__all__ = ["RetinaFocalCOCOEvaluator", "RetinaFocalFastCOCOEvaluator", "evaluator_class"]

logger = logging.getLogger(__name__)

# "info.description" that detectron2's convert_to_coco_dict writes into every json it makes
_CONVERTED_JSON_DESCRIPTION = "Automatically generated COCO json file for Detectron2."


class RetinaFocalCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator plus a logged note (WARNING, logger ``retina_focal.evaluation``) when AP
    is NaN because nothing was detected or because the evaluated images hold no ground truth.

    Example::

        evaluator = RetinaFocalCOCOEvaluator(
            "retina_focal_shapes_val", output_dir=out, score_thresh=cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        )
        results = inference_on_dataset(model, loader, evaluator)  # {"bbox": {"AP": ..., ...}}
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        score_thresh: Optional[float] = None,
        **kwargs,
    ):
        """
        Args:
            dataset_name, tasks, distributed, output_dir, **kwargs: as for COCOEvaluator
                (``max_dets_per_image``, ``use_fast_impl``, ``kpt_oks_sigmas``,
                ``allow_cached_coco``).
            score_thresh (float or None): the model's test score threshold
                (``MODEL.RETINANET.SCORE_THRESH_TEST``), in [0, 1]; only quoted in the note
                when the model detects nothing.
        """
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        self._dataset_name = dataset_name
        self._score_thresh = score_thresh
        if not self._do_evaluation and _is_converted_from_dicts(self._coco_api.dataset):
            self._use_empty_ground_truth(kwargs.get("kpt_oks_sigmas", ()))

    def _use_empty_ground_truth(self, kpt_oks_sigmas) -> None:
        """The dataset's dicts hold no annotation: evaluate against an empty ground truth
        (every AP NaN, plus the note) instead of skipping evaluation as for a test split."""
        self._coco_api.dataset["annotations"] = []
        with contextlib.redirect_stdout(io.StringIO()):  # COCO.createIndex prints
            self._coco_api.createIndex()
        self._do_evaluation = True
        self._kpt_oks_sigmas = kpt_oks_sigmas

    def _eval_predictions(self, predictions: List[Dict], img_ids=None):
        """COCOEvaluator's evaluation (main process, after gathering), then the notes.

        Args:
            predictions (list[dict]): one per image, {"image_id": int, "instances": list of
                COCO-format result dicts}.
            img_ids (list[int] or None): images to evaluate; None means all predicted ones.
        """
        if img_ids is None and self._do_evaluation:
            img_ids = self._predicted_images(predictions)
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not self._do_evaluation:
            return
        image_ids = set(img_ids) if img_ids is not None else {p["image_id"] for p in predictions}
        if _count_detections(predictions, image_ids) == 0:
            logger.warning(self._no_detections_note(len(image_ids)))
        if _count_ground_truth(self._coco_api, image_ids) == 0:
            logger.warning(self._no_ground_truth_note(len(image_ids)))

    def _predicted_images(self, predictions: List[Dict]) -> Optional[List[int]]:
        """None (all images of the ground truth) when every one was predicted; else the
        predicted ones, with a warning: images the model never saw (left out as unusable,
        ``DATALOADER.CHECK_IMAGES``) would otherwise count as all-missed."""
        predicted = {p["image_id"] for p in predictions}
        all_images = set(self._coco_api.getImgIds())
        if predicted >= all_images:
            return None
        logger.warning(
            f"RetinaFocalCOCOEvaluator: {len(all_images - predicted)} of the {len(all_images)} images of "
            f"'{self._dataset_name}' were not predicted (see the warning that left them out); AP is over the "
            f"{len(predicted & all_images)} predicted images"
        )
        return sorted(predicted & all_images)

    def _no_detections_note(self, num_images: int) -> str:
        thresh = "" if self._score_thresh is None else f" (= {self._score_thresh:g} here)"
        return (
            f"RetinaFocalCOCOEvaluator: the model produced 0 detections on the {num_images} "
            f"evaluated images of '{self._dataset_name}', so AP is NaN (there is nothing to rank). "
            f"RetinaFocal drops every score at or below MODEL.RETINANET.SCORE_THRESH_TEST{thresh}; "
            "an untrained model scores about the prior 0.01 everywhere (§3.3). "
            "Lower the threshold or train longer."
        )

    def _no_ground_truth_note(self, num_images: int) -> str:
        return (
            f"RetinaFocalCOCOEvaluator: dataset '{self._dataset_name}' has 0 ground-truth "
            f"annotations (iscrowd=0) on the {num_images} evaluated images, so AP is undefined and "
            "reported as NaN: recall = true positives / ground-truth boxes divides by zero "
            "(pycocotools prints -1). Evaluate on images that have annotations."
        )


def _is_converted_from_dicts(coco_dataset: Dict) -> bool:
    """Whether a COCO json was written by detectron2's ``convert_to_coco_dict``, which omits
    "annotations" when there are none (so a missing key means 0 annotations, not a test split)."""
    return coco_dataset.get("info", {}).get("description") == _CONVERTED_JSON_DESCRIPTION


def _count_detections(predictions: List[Dict], image_ids: AbstractSet[int]) -> int:
    """Number of COCO-format results on ``image_ids``."""
    return sum(len(p["instances"]) for p in predictions if p["image_id"] in image_ids)


def _count_ground_truth(coco_api, image_ids: AbstractSet[int]) -> int:
    """Number of non-crowd annotations on ``image_ids``; COCOeval ignores crowd boxes."""
    return sum(1 for i in image_ids for ann in coco_api.imgToAnns.get(i, []) if not ann.get("iscrowd", 0))


# TEST.EVALUATOR names (retina_focal.engine.RetinaFocalTrainer.build_evaluator)
EVALUATOR_KEY = "TEST.EVALUATOR"
FASTER_COCO_EVAL = "faster_coco_eval"


def _faster_cocoeval_class():
    """faster-coco-eval's C++ ``COCOeval_faster``, or an ImportError that says what to install."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError as e:
        raise ImportError(
            f"{EVALUATOR_KEY} {FASTER_COCO_EVAL!r} needs the faster-coco-eval package: "
            f"pip install faster-coco-eval (or set {EVALUATOR_KEY} coco for pycocotools)"
        ) from e
    return COCOeval_faster


@contextlib.contextmanager
def _detectron2_fast_cocoeval(cocoeval_cls):
    """Make COCOEvaluator's "fast implementation" be ``cocoeval_cls`` for a while.

    The one patch of detectron2 in retina_focal: detectron2 0.7's COCOEvaluator has no
    argument for its COCOeval class. It reads the module global ``COCOeval_opt`` (pycocotools'
    COCOeval when detectron2 has no compiled ``_C``) in ``__init__`` ("if use_fast_impl and
    (COCOeval_opt is COCOeval): ... use_fast_impl = False") and in ``_eval_predictions``
    ("cocoeval_fn=COCOeval_opt if self._use_fast_impl else COCOeval")."""
    saved = d2_coco_evaluation.COCOeval_opt
    d2_coco_evaluation.COCOeval_opt = cocoeval_cls
    try:
        yield
    finally:
        d2_coco_evaluation.COCOeval_opt = saved


class RetinaFocalFastCOCOEvaluator(RetinaFocalCOCOEvaluator):
    """:class:`RetinaFocalCOCOEvaluator` whose COCOeval is faster-coco-eval's C++
    ``COCOeval_faster`` (``TEST.EVALUATOR faster_coco_eval``): the same result dict and
    the same ``coco_instances_results.json``, the AP computed by the same algorithm
    (``tests/evaluation/test_fast_eval.py`` checks it against pycocotools to 1e-4).

    detectron2's ``COCOEvaluator`` passes its ``COCOeval_opt`` (detectron2's own C++
    evaluator, or pycocotools' Python one where ``detectron2._C`` is missing) to
    ``_evaluate_predictions_on_coco(..., cocoeval_fn=...)``; this class has it pass
    ``COCOeval_faster`` instead. A custom ``max_dets_per_image`` (third value other than
    100) still uses detectron2's pycocotools-based ``COCOevalMaxDets``.
    """

    def __init__(self, dataset_name: str, tasks=None, distributed: bool = True, output_dir: Optional[str] = None, **kwargs):
        """Arguments as :class:`RetinaFocalCOCOEvaluator` (``use_fast_impl`` is implied).

        Raises:
            ImportError: faster-coco-eval is not installed (the message gives the pip command).
        """
        self._cocoeval_cls = _faster_cocoeval_class()
        kwargs["use_fast_impl"] = True
        with _detectron2_fast_cocoeval(self._cocoeval_cls):  # so that use_fast_impl stays on
            super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)

    def _eval_predictions(self, predictions: List[Dict], img_ids=None):
        with _detectron2_fast_cocoeval(self._cocoeval_cls):
            super()._eval_predictions(predictions, img_ids=img_ids)


EVALUATORS = {"coco": RetinaFocalCOCOEvaluator, FASTER_COCO_EVAL: RetinaFocalFastCOCOEvaluator}


def evaluator_class(name: str):
    """The evaluator class that ``TEST.EVALUATOR`` names, or a ValueError listing the names."""
    if name not in EVALUATORS:
        raise ValueError(f"{EVALUATOR_KEY} must be one of {sorted(EVALUATORS)}, got {name!r}")
    return EVALUATORS[name]
