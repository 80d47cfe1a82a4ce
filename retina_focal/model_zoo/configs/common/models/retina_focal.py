"""RetinaFocal as a LazyConfig: the model of configs/Base-RetinaFocal.yaml with ResNet-50
(configs/COCO-Detection/retina_focal_R_50_FPN_1x.yaml), spelled out in the constructors'
arguments. tests/engine/test_lazy.py checks that both build the same parameters and outputs."""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform

from retina_focal.modeling.anchors import RetinaFocalAnchorGenerator
from retina_focal.modeling.head import RetinaFocalHead
from retina_focal.modeling.losses import FocalLoss
from retina_focal.modeling.matching import build_anchor_matcher
from retina_focal.modeling.meta_arch import RetinaFocal

model = L(RetinaFocal)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,  # stem and res2 frozen (detectron2's MODEL.BACKBONE.FREEZE_AT)
        ),
        in_features=["res3", "res4", "res5"],  # P3-P5 from C3-C5 (§4, footnote 2)
        out_channels=256,  # C = 256 on every level (§4)
        # P6 = 3x3 stride-2 conv on C5 (not P5), P7 the same on ReLU(P6) (§4, footnote 2)
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}", in_feature="res5"),
    ),
    head=L(RetinaFocalHead)(
        in_channels="${..backbone.out_channels}",
        num_anchors=9,  # 3 scales x 3 aspect ratios (§4 "Anchors")
        num_classes="${..num_classes}",
        num_convs=4,  # 4 x (3x3 conv, ReLU) per subnet (§4)
        norm="",
        prior_prob=0.01,  # π (§3.3, §4.1 "Initialization")
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(RetinaFocalAnchorGenerator)(
        # areas 32^2 ... 512^2 on P3-P7, scales 2^0, 2^(1/3), 2^(2/3), ratios 1:2, 1:1, 2:1 (§4)
        sizes=[[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
        aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,  # detectron2's MODEL.ANCHOR_GENERATOR.OFFSET
    ),
    box2box_transform=L(Box2BoxTransform)(weights=(1.0, 1.0, 1.0, 1.0)),
    # bg < 0.4 <= ignored < 0.5 <= fg (§4)
    anchor_matcher=L(build_anchor_matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1], every_gt=False),
    num_classes=80,
    cls_loss=L(FocalLoss)(alpha=0.25, gamma=2.0),  # best in Table 1b
    box_reg_loss_type="smooth_l1",
    smooth_l1_beta=0.1,  # (not in the paper: "standard smooth L1", §4.1)
    test_score_thresh=0.05,  # §4.1 "Inference"
    test_topk_candidates=1000,  # per level (§4.1 "Inference")
    test_nms_thresh=0.5,  # §4.1 "Inference"
    max_detections_per_image=100,
    pixel_mean=[103.530, 116.280, 123.675],  # detectron2's MSRA ResNet inputs: BGR, 0-255
    pixel_std=[1.0, 1.0, 1.0],
)
