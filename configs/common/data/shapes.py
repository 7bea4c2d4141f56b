"""The bundled shapes dataset (generated on first use, see rankdetr/data/synthetic.py), with
DETR-style augmentations scaled to its small images (128-160 px)."""

from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from rankdetr.data.mapper import DetrDatasetMapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        min_sizes=(128, 144, 160, 176),
        max_size=256,
        crop_resize_sizes=(128, 160),
        crop_size=(96, 160),
        crop_probability=0.3,
        image_format="RGB",
    ),
    total_batch_size=8,
    num_workers=2,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(is_train=False, test_size=160, max_size=256, image_format="RGB"),
    num_workers=2,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=False, output_dir=None
)
