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
from detectron2.config import CfgNode as CN


def add_retina_focal_config(cfg: CN) -> CN:
    """Add the ``MODEL.RETINA_FOCAL`` node to ``cfg`` (in place) and return ``cfg``.

    Call it after ``get_cfg()`` and before ``merge_from_file``. Calling it twice is harmless.
    """
    if "RETINA_FOCAL" in cfg.MODEL:
        return cfg
    _C = cfg
    _C.MODEL.RETINA_FOCAL = CN()
    # Registry name of the head (retina_focal.RETINA_FOCAL_HEAD_REGISTRY).
    _C.MODEL.RETINA_FOCAL.HEAD_NAME = "RetinaFocalHead"
    # Input of P6: "res5" = C5 as in the paper (§4, footnote 2), or "p5" = the FPN output
    # P5, as some later detectors (e.g. FCOS) do.
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
    return cfg
