"""The CPU demo (retina_focal_R_18_FPN_demo.yaml) as a LazyConfig: ResNet-18-FPN with GroupNorm,
trained from scratch on the synthetic shapes dataset.

    python train_net.py --config-file configs/Shapes-Detection/retina_focal_R_18_FPN_demo.py
"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from retina_focal.data import checked_dataset_dicts
from retina_focal.evaluation import RetinaFocalCOCOEvaluator

from ..common.models.retina_focal import model

# No ImageNet weights here: GroupNorm instead of (frozen) BatchNorm everywhere, nothing frozen
# (BN statistics of a random network at batch 16 stall training; docs/demo.md).
resnet = model.backbone.bottom_up
resnet.stem.norm = "GN"
resnet.stages.depth = 18  # BasicBlock stages, res5 has 512 channels
resnet.stages.norm = "GN"
del resnet.stages.stride_in_1x1  # a Bottleneck argument
resnet.freeze_at = 0
model.backbone.norm = "GN"
model.backbone.out_channels = 64  # C = 64 instead of 256: the head costs ~C^2 (docs/demo.md)
model.backbone.top_block.in_channels = 512
model.head.norm = "GN"
# 128-px images: anchors 4x the stride would miss the 8-px shapes, so the octave scheme of §4
# starts at 16 px on P3 (stride 8)
model.anchor_generator.sizes = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]]
model.num_classes = 5

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    # the checks of the .yaml trainer: classes, boxes, unreadable or truncated images
    dataset=L(checked_dataset_dicts)(
        names="retina_focal_shapes_train",
        num_classes="${model.num_classes}",
        filter_empty=False,  # images without objects train too (all anchors negative)
        short_edge=128,
        max_size=128,
    ),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
    ),
    total_batch_size=16,
    num_workers=0,  # 128-px PNGs load fast; on 2 cores a worker only competes
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="retina_focal_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)],
        image_format="BGR",
    ),
    num_workers=0,
)
dataloader.evaluator = L(RetinaFocalCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
    score_thresh="${model.test_score_thresh}",
)

optimizer = get_config("common/optim.py").SGD  # momentum 0.9, weight decay 1e-4 (§4.1)
optimizer.lr = 0.02
# LR / 10 at 2/3 and 8/9 of training, as 60k and 80k of 90k (§4.1), after a 100-iteration warm-up
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[800, 1067], num_updates=1200),
    warmup_length=100 / 1200,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 1200
train.eval_period = 400  # AP curve on the val set at 400, 800, 1200
train.checkpointer.period = 500
train.output_dir = "output/shapes_demo_lazy"
train.seed = 1
