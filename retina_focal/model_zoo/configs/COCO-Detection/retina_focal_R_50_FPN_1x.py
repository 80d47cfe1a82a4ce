"""RetinaNet-50-800, 1x schedule (Table 1e row "50 / 800") as a LazyConfig: the model, data,
optimizer and schedule of retina_focal_R_50_FPN_1x.yaml (the paper's §4.1 "Optimization").

    python train_net.py --num-gpus 8 --config-file configs/COCO-Detection/retina_focal_R_50_FPN_1x.py
"""
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config

from retina_focal.data import checked_dataset_dicts
from retina_focal.evaluation import RetinaFocalCOCOEvaluator

from ..common.models.retina_focal import model  # noqa: F401 (the config's model)

dataloader = get_config("common/data/coco.py").dataloader
# the checks of the .yaml trainer: classes, boxes, unreadable or truncated images
dataloader.train.dataset = L(checked_dataset_dicts)(
    names="coco_2017_train", num_classes="${model.num_classes}", filter_empty=True, short_edge=800, max_size=1333
)
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations = [
    # 800-px short side, horizontal flip as the only augmentation (§4.1)
    L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16  # 8 GPUs x 2 images (§4.1)
dataloader.evaluator = L(RetinaFocalCOCOEvaluator)(
    dataset_name="${..test.dataset.names}", score_thresh="${model.test_score_thresh}"
)

# SGD, momentum 0.9, weight decay 1e-4, LR 0.01 (§4.1); /10 at 60k and 80k of 90k iterations,
# after detectron2's 1000-iteration linear warm-up (not in the paper)
optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.output_dir = "output/retina_focal_R_50_FPN_1x_lazy"
