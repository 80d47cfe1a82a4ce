"""COCO evaluation (pycocotools or faster-coco-eval) with the paper's score threshold."""
from retina_focal.evaluation.coco_evaluation import *  # noqa: F401,F403
from retina_focal.evaluation.coco_evaluation import __all__  # noqa: F401
