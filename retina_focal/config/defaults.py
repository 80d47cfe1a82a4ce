"""Config keys added by retina_focal.

Everything new lives under ``cfg.MODEL.RETINA_FOCAL``. Keys that detectron2 already
defines with the right meaning are reused, not copied (see "Config keys" in README.md):

- ``MODEL.RETINANET``: NUM_CLASSES, IN_FEATURES, NUM_CONVS, PRIOR_PROB, NORM,
  IOU_THRESHOLDS, IOU_LABELS, FOCAL_LOSS_ALPHA, FOCAL_LOSS_GAMMA, SMOOTH_L1_LOSS_BETA,
  BBOX_REG_LOSS_TYPE, BBOX_REG_WEIGHTS, SCORE_THRESH_TEST, TOPK_CANDIDATES_TEST,
  NMS_THRESH_TEST;
- ``MODEL.ANCHOR_GENERATOR``: SIZES, ASPECT_RATIOS, OFFSET;
- ``MODEL.FPN``: IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE;
- ``MODEL.RESNETS``: all of them; ``TEST.DETECTIONS_PER_IMAGE``.

A detectron2 RetinaNet config therefore runs after changing three names:
``META_ARCHITECTURE: RetinaFocal``, ``BACKBONE.NAME: build_retina_focal_resnet_fpn_backbone``
and ``ANCHOR_GENERATOR.NAME: RetinaFocalAnchorGenerator``.
"""
import logging
import os
from functools import lru_cache
from typing import Callable, List

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["BACKBONE_CONFIG_NODES", "add_retina_focal_config", "config_extension", "extensions", "warn_ignored_settings"]

logger = logging.getLogger(__name__)


# Functions ``(cfg) -> None`` that add a plugin part's own config node (e.g. a backbone's
# MODEL.MOBILENET_V2), registered with @config_extension; add_retina_focal_config runs them all.
_EXTENSIONS: List[Callable[[CN], None]] = []
# The config node each backbone builder reads, by a part of its registry name: set keys of a
# node whose backbone is not built are warned about (warn_ignored_settings).
BACKBONE_CONFIG_NODES = {"MODEL.RESNETS": "resnet", "MODEL.MOBILENET_V2": "mobilenet_v2"}


def config_extension(add: Callable[[CN], None]) -> Callable[[CN], None]:
    """Decorator: ``add(cfg)`` adds a part's own keys whenever ``add_retina_focal_config`` runs
    (the hook for a backbone, head or loss that needs keys of its own; docs/extend.md). The
    module that defines it must be imported before configs are created, as registration needs."""
    _EXTENSIONS.append(add)
    return add


def extensions() -> List[Callable[[CN], None]]:
    """The registered :func:`config_extension` functions, in registration order."""
    return list(_EXTENSIONS)


def add_retina_focal_config(cfg: CN) -> CN:
    """Add the ``MODEL.RETINA_FOCAL`` node, and the nodes of the :func:`config_extension`
    functions, to ``cfg`` (in place) and return ``cfg``.

    Call it after ``get_cfg()`` and before ``merge_from_file``. Calling it twice is harmless.
    """
    if "RETINA_FOCAL" in cfg.MODEL:
        return cfg
    for add in _EXTENSIONS:
        add(cfg)
    _C = cfg
    _C.MODEL.RETINA_FOCAL = CN()
    # Registry name of the head (retina_focal.RETINA_FOCAL_HEAD_REGISTRY).
    _C.MODEL.RETINA_FOCAL.HEAD_NAME = "RetinaFocalHead"
    # RetinaFocalLightHead: towers of CHANNELS channels (a 1x1 conv maps C to it) and
    # NUM_CONVS 3x3 convs each, instead of §4's C = 256 and 4.
    _C.MODEL.RETINA_FOCAL.LIGHT_HEAD = CN()
    _C.MODEL.RETINA_FOCAL.LIGHT_HEAD.CHANNELS = 128
    _C.MODEL.RETINA_FOCAL.LIGHT_HEAD.NUM_CONVS = 2
    # Input of P6: "res5" = C5 as in the paper (§4, footnote 2), any other feature the
    # bottom-up network outputs, or "p5" = the FPN output P5, as some later detectors (FCOS) do.
    _C.MODEL.RETINA_FOCAL.P6_FROM = "res5"
    # Momentum of the running average of the number of foreground anchors that normalizes
    # both losses. §4.1 normalizes each image's loss by its assigned anchors; Detectron
    # divides the per-GPU batch sum by the batch's count (momentum 0 here); detectron2
    # smooths that count (momentum 0.9) so small per-GPU batches are stable.
    _C.MODEL.RETINA_FOCAL.LOSS_NORMALIZER_MOMENTUM = 0.9

    # Classification loss (retina_focal.RETINA_FOCAL_LOSS_REGISTRY). The focal loss reads
    # its alpha/gamma from MODEL.RETINANET.FOCAL_LOSS_ALPHA/_GAMMA (Table 1b: 0.25, 2.0).
    _C.MODEL.RETINA_FOCAL.LOSS = CN()
    _C.MODEL.RETINA_FOCAL.LOSS.NAME = "FocalLoss"
    # FocalLoss / FocalLossStar: per-class α (K values, for long-tailed data); [] =
    # FOCAL_LOSS_ALPHA for every class.
    _C.MODEL.RETINA_FOCAL.LOSS.CLASS_ALPHA = []
    # > 0 and CLASS_ALPHA empty: CLASS_ALPHA computed from DATASETS.TRAIN's box counts per class
    # ("effective number of samples", Cui et al. CVPR 2019, with this β, e.g. 0.999):
    # α_k = min(1, FOCAL_LOSS_ALPHA·w_k), w normalized to mean 1; logged, and written into
    # CLASS_ALPHA of the run's config.yaml. 0 = off.
    _C.MODEL.RETINA_FOCAL.LOSS.CLASS_BALANCED_BETA = 0.0
    # FocalLossStar (Appendix A): FL* = -log σ(γ·x_t + β) / γ with γ = FOCAL_LOSS_GAMMA;
    # Table 3 / the paper's selected setting: γ = 2, β = 1 (33.8 AP vs FL's 34.0).
    _C.MODEL.RETINA_FOCAL.LOSS.BETA = 1.0
    # OHEMLoss (Table 1d): per image, CE-scored anchors, NMS at OHEM_NMS_THRESH over their
    # boxes, the OHEM_BATCH_SIZE hardest survivors; OHEM_POSITIVE_FRACTION 0.25 = "OHEM
    # 1:3" (SSD's ratio), < 0 = no ratio. Best in Table 1d: 128, 0.5, no ratio (32.8 AP).
    _C.MODEL.RETINA_FOCAL.LOSS.OHEM_BATCH_SIZE = 128
    _C.MODEL.RETINA_FOCAL.LOSS.OHEM_NMS_THRESH = 0.5
    _C.MODEL.RETINA_FOCAL.LOSS.OHEM_POSITIVE_FRACTION = -1.0
    # OHEMLoss with a POSITIVE_FRACTION f: "ssd" = at most ⌊f·B⌋ positives and at most
    # (1 - f)/f negatives per positive (SSD's rule, cited by §5.1 for "OHEM 1:3"; the Table 1d
    # 1:3 configs use it); "positive_quota" = at most ⌊f·B⌋ positives, negatives fill to B.
    _C.MODEL.RETINA_FOCAL.LOSS.OHEM_RATIO_RULE = "ssd"
    # OHEMLoss: NMS sees at most this many highest-loss anchors per image when it picks the
    # negatives (0: all); with a positive fraction positives are always picked exactly,
    # negatives whenever the choice lies among them (without one, every anchor is in that
    # window). NMS over all ~100k anchors of a 600-px image takes 7-60 s on a CPU.
    _C.MODEL.RETINA_FOCAL.LOSS.OHEM_MAX_CANDIDATES = 4096

    # Anchor labelling. False: detectron2's (and Detectron's) rule, under which a ground-truth
    # box can end up with no anchor when its best anchors overlap another box more. True:
    # such boxes then take their best free anchor (retina_focal.modeling.matching.EveryGTMatcher).
    _C.MODEL.RETINA_FOCAL.MATCH_EVERY_GT = False
    # Crowd regions (COCO iscrowd, VOC difficult / the CSV ignore class as crowd, see DATASETS.*):
    # > 0 keeps them through the mapper and ignores (-1) the background anchors a region
    # covers by more than this share of the anchor's area (foreground anchors stay); 0 = the
    # paper's and detectron2's behaviour: crowd boxes are dropped, their anchors train as
    # background. retina_focal/data/mapper.py.
    _C.MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA = 0.0
    # Inference (§4.1 keeps MODEL.RETINANET.SCORE_THRESH_TEST for every class and NMS per
    # class). CLASS_SCORE_THRESH: one threshold per class (K values) instead; [] = off.
    _C.MODEL.RETINA_FOCAL.CLASS_SCORE_THRESH = []
    # True: one NMS over all classes (a box suppresses overlapping boxes of any class).
    _C.MODEL.RETINA_FOCAL.CLASS_AGNOSTIC_NMS = False
    # Speed transforms (retina_focal/modeling/fast_layers.py, modeling/postprocess.py), float rounding only; all off = detectron2's
    # RetinaNet bit for bit. CHANNELS_LAST: backbone and head in the channels-last (NHWC)
    # memory format, which oneDNN (CPU with AVX-512) and tensor cores (GPU) prefer; None =
    # on, except on a CPU where torch's capability is AVX2 (slower there, measured in
    # docs/benchmark.md); True/False force it. FOLD_FROZEN_BN: each
    # conv + frozen BatchNorm (MODEL.RESNETS.NORM FrozenBN) as one conv with the BN folded
    # into its weight and bias. FAST_POSTPROCESS: §4.1's inference thresholded and ranked on
    # logits, with a chunked top-k and NMS truncated exactly. tools/benchmark.py measures them.
    _C.MODEL.RETINA_FOCAL.CHANNELS_LAST = None
    _C.MODEL.RETINA_FOCAL.FOLD_FROZEN_BN = True
    _C.MODEL.RETINA_FOCAL.FAST_POSTPROCESS = True
    # Mixed precision (retina_focal/modeling/precision.py, retina_focal/engine/amp.py). SOLVER.AMP.ENABLED (detectron2's key) trains
    # under torch.autocast on any device, CUDA or CPU; its dtype: "float16" (loss scaled by a
    # GradScaler), "bfloat16" (no scaling needed), or "auto" = float16 on CUDA, bfloat16
    # elsewhere. Losses and post-processing stay float32 either way.
    _C.SOLVER.AMP.PRECISION = "auto"
    # SOLVER.COMPILE.ENABLED: backbone and head of the training model under torch.compile
    # (retina_focal/engine/compile.py); anchor matching and losses stay eager. The first step
    # pays the compilation.
    _C.SOLVER.COMPILE = CN()
    _C.SOLVER.COMPILE.ENABLED = False
    # Inference (evaluation, --eval-only, retina-focal-predict, validation losses): backbone
    # and head under torch.autocast(TEST.AMP.PRECISION, same values as above). Off: the model
    # opens no autocast of its own and keeps whatever autocast its caller opened.
    _C.TEST.AMP = CN()
    _C.TEST.AMP.ENABLED = False
    _C.TEST.AMP.PRECISION = "auto"
    _C.register_renamed_key(
        "MODEL.RETINA_FOCAL.BF16",
        "TEST.AMP.ENABLED",
        "MODEL.RETINA_FOCAL.BF16 True is now TEST.AMP.ENABLED True TEST.AMP.PRECISION bfloat16 for "
        "inference, and SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16 for training",
    )
    # Inference backend (retina_focal/export/backends.py) of --eval-only, retina-focal-predict and
    # tools/export.py --backend: "eager" = the PyTorch model; "compiled" = torch.export +
    # AOTInductor; "onnxruntime" = the ONNX export on ONNX Runtime's CPU provider; "auto" = one
    # of these and its precision, chosen from the CPU's ISA flags and logged (int8 with VNNI or
    # AMX, else bfloat16 with AVX512-BF16, else ONNX Runtime int8). The backends other than eager
    # run one image at a time and cache what they build in CACHE_DIR ("" = OUTPUT_DIR/
    # inference_backend). INT8 (compiled: PT2E + torchao's X86InductorQuantizer into oneDNN;
    # onnxruntime: QDQ): static int8 quantization calibrated on CALIBRATION_IMAGES images of
    # DATASETS.TRAIN. Evaluation during training stays eager.
    _C.TEST.BACKEND = CN()
    _C.TEST.BACKEND.NAME = "eager"
    _C.TEST.BACKEND.INT8 = False
    _C.TEST.BACKEND.CALIBRATION_IMAGES = 200
    _C.TEST.BACKEND.CACHE_DIR = ""
    # Loading a checkpoint whose classifier has another number of classes is an error; True
    # loads every other weight and keeps the new classifier (fine-tuning on a new dataset).
    _C.MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER = False

    # Iterations between two rows of metrics.json / the console log; each row holds the
    # median of the iterations since the previous one (1 = every iteration's own values).
    _C.SOLVER.LOG_PERIOD = 20
    # Training augmentation (retina_focal/data/augmentation.py), added to detectron2's
    # INPUT.CROP, multi-scale INPUT.MIN_SIZE_TRAIN and INPUT.RANDOM_FLIP, which also takes
    # "both" here (horizontal and vertical flips, for pictures without an up). COLOR_JITTER: δ > 0
    # scales brightness, contrast or saturation by a random factor in [1 - δ, 1 + δ]; 0 = off.
    # SCALE_JITTER: instead of that resize and crop, scale each image to fit a SIZE x SIZE square
    # times a factor from RANGE, then crop at most SIZE x SIZE at random (fixed cost per batch).
    _C.INPUT.SCALE_JITTER = CN()
    _C.INPUT.SCALE_JITTER.ENABLED = False
    _C.INPUT.SCALE_JITTER.RANGE = (0.5, 1.5)
    _C.INPUT.SCALE_JITTER.SIZE = 512
    _C.INPUT.COLOR_JITTER = CN()
    _C.INPUT.COLOR_JITTER.BRIGHTNESS = 0.0
    _C.INPUT.COLOR_JITTER.CONTRAST = 0.0
    _C.INPUT.COLOR_JITTER.SATURATION = 0.0
    # Datasets named as specs in DATASETS.TRAIN / DATASETS.TEST ("coco:", "voc:", "csv:";
    # retina_focal/data/formats.py): VOC objects marked <difficult> become crowd regions
    # (ignored by COCOEvaluator, and by training with MODEL.RETINA_FOCAL.CROWD_IGNORE_IOA > 0)
    # instead of boxes; rows of this CSV class name are crowd regions, not a class ("" = none).
    _C.DATASETS.VOC_DIFFICULT_AS_CROWD = False
    _C.DATASETS.CSV_IGNORE_CLASS = ""
    # Image files of the training and test sets, checked once before they are used (skipped
    # with a warning that names each file): "quick" = header and end marker (a truncated
    # JPEG/PNG has lost it; ~0.1 ms per image), "full" = decode every pixel, "none" = off.
    # Images too elongated for the resize (a side would become 0 px) are skipped too.
    _C.DATALOADER.CHECK_IMAGES = "quick"
    # --resume refuses a run whose SOLVER.IMS_PER_BATCH, number of processes, MAX_ITER, STEPS
    # or training sets differ from the checkpoint's (the data stream and the LR schedule depend
    # on them). True: resume anyway; the stream continues at the number of images seen.
    _C.RESUME = CN()
    _C.RESUME.ALLOW_CHANGES = False
    # --resume from this checkpoint (a file name in OUTPUT_DIR, or a path) instead of the one
    # named in OUTPUT_DIR/last_checkpoint, e.g. the previous one when the last is truncated.
    _C.RESUME.CHECKPOINT = ""
    # Model EMA (retina_focal/engine/ema.py; d2go's keys): an exponential moving average of the weights
    # updated after every step; evaluation and the checkpoints' "model" use it (the raw weights
    # stay in the checkpoint). DECAY is the largest decay; it ramps up as (1 + t) / (10 + t).
    _C.MODEL_EMA = CN()
    _C.MODEL_EMA.ENABLED = False
    _C.MODEL_EMA.DECAY = 0.999
    # Bitwise-reproducible training: deterministic kernels (torch.use_deterministic_algorithms,
    # cuDNN without autotuning) and a fixed SEED (must be >= 0). See docs/reliability.md.
    _C.DETERMINISTIC = False

    # Evaluator of the test sets (train_net.py, --eval-only, TEST.EVAL_PERIOD): "coco" =
    # detectron2's COCOEvaluator (pycocotools' Python COCOeval without detectron2's _C);
    # "faster_coco_eval" = the same metrics from the C++ COCOeval of the faster-coco-eval
    # package (pip install faster-coco-eval).
    _C.TEST.EVALUATOR = "coco"

    # Diagnostics (docs/diagnostics.md). Warn once when more than this share of a training
    # batch's ground-truth boxes has no anchor with IoU >= the foreground threshold (0.5,
    # §4); 1.0 = never. 0.5 is silent on the demo (about 16% of its boxes, the 8-16 px
    # ones, miss) and loud for a badly sized anchor set. The "assign/*" metrics are logged
    # every iteration regardless.
    _C.MODEL.RETINA_FOCAL.UNMATCHED_GT_WARN_FRACTION = 0.5
    # Every this many iterations (and after the last), the training losses on the
    # DATASETS.TEST images, without gradient and without touching the EMA loss normalizer,
    # logged as val_loss_cls, val_loss_box_reg, val_total_loss; 0 = off.
    _C.TEST.VAL_LOSS_PERIOD = 0
    # Images of DATASETS.TEST used for the validation losses (the first N); 0 = all.
    _C.TEST.VAL_LOSS_NUM_IMAGES = 0
    # After each evaluation, keep model_best.pth for the best value of this metric of the
    # EventStorage (e.g. "bbox/AP", or "val_total_loss" with mode "min"); "" = off.
    _C.SOLVER.BEST_CHECKPOINT_METRIC = ""
    # "max" (AP) or "min" (a loss) for SOLVER.BEST_CHECKPOINT_METRIC.
    _C.SOLVER.BEST_CHECKPOINT_MODE = "max"
    return cfg


# Keys that detectron2's RetinaNet (and RetinaFocal) never reads, with the key to use instead.
_IGNORED_KEYS = {
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "MODEL.RETINANET.SCORE_THRESH_TEST",
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": "MODEL.RETINANET.NMS_THRESH_TEST",
    "MODEL.ROI_HEADS.NUM_CLASSES": "MODEL.RETINANET.NUM_CLASSES",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "MODEL.RPN.IOU_THRESHOLDS": "MODEL.RETINANET.IOU_THRESHOLDS",
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "MODEL.MASK_ON": None,
    "MODEL.KEYPOINT_ON": None,
}


@lru_cache(maxsize=1)
def _detectron2_defaults() -> CN:
    return add_retina_focal_config(get_cfg())


def _changed_keys(node: CN, default: CN, prefix: str) -> List[str]:
    changed = []
    for key, value in node.items():
        if isinstance(value, CN):
            changed += _changed_keys(value, default[key], f"{prefix}.{key}")
        elif value != default.get(key):
            changed.append(f"{prefix}.{key}={value}")
    return changed


# Every model-zoo config derives from it; what it sets is the starting point, not a choice.
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_zoo", "configs", "Base-RetinaFocal.yaml")


@lru_cache(maxsize=1)
def _base_config() -> CN:
    cfg = _detectron2_defaults().clone()
    cfg.merge_from_file(BASE_CONFIG)
    return cfg


def _warn_other_backbones_keys(cfg: CN) -> None:
    """Warn about keys of a backbone that is not the one built, set to other values than
    Base-RetinaFocal.yaml's (e.g. MODEL.RESNETS.DEPTH from a ResNet config under a MobileNetV2
    backbone; not the base's RESNETS.OUT_FEATURES, which every config inherits)."""
    name, defaults = cfg.MODEL.BACKBONE.NAME, _base_config()
    for node_key, part in BACKBONE_CONFIG_NODES.items():
        if part in name or node_key.split(".")[-1] not in cfg.MODEL:
            continue
        changed = _changed_keys(_lookup(cfg, node_key), _lookup(defaults, node_key), node_key)
        if changed:
            logger.warning(f"{', '.join(changed)}: no effect, MODEL.BACKBONE.NAME is {name} (it does not read {node_key})")


def _lookup(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def warn_ignored_settings(cfg: CN) -> None:
    """Warn about keys changed from detectron2's defaults that have no effect on RetinaFocal.

    The classic trap: ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` (read by R-CNNs only) set in
    the hope of filtering RetinaNet's detections.
    """
    defaults = _detectron2_defaults()
    _warn_other_backbones_keys(cfg)
    for key, use in _IGNORED_KEYS.items():
        value = _lookup(cfg, key)
        if value == _lookup(defaults, key):
            continue
        if use is None:
            logger.warning(f"{key}={value} has no effect: RetinaFocal predicts boxes only")
        elif value != _lookup(cfg, use):
            logger.warning(f"{key}={value} has no effect on RetinaFocal; set {use} (now {_lookup(cfg, use)})")
