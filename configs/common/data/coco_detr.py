"""COCO 2017 with the DETR / Rank-DETR augmentations (paper Sec. 4.1), in detrex's layout.

Train: random flip; then either resize the shorter side to one of 480..800 (step 32, max 1333), or
resize to 400/500/600, crop 384-600, and resize as before (`augmentation_with_crop`, chosen for
half the images). Test: shorter side 800, max 1333.
The images are read from $DETECTRON2_DATASETS/coco (see README).
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from omegaconf import OmegaConf

from rankdetr.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
from rankdetr.data.mapper import DetrDatasetMapper
from rankdetr.evaluation import RankDETRCOCOEvaluator

DETR_SHORT_EDGES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DetrDatasetMapper)(
        augmentation=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(
                short_edge_length=DETR_SHORT_EDGES, max_size=1333, sample_style="choice"
            ),
        ],
        augmentation_with_crop=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(short_edge_length=(400, 500, 600), sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
            L(T.ResizeShortestEdge)(
                short_edge_length=DETR_SHORT_EDGES, max_size=1333, sample_style="choice"
            ),
        ],
        crop_probability=0.5,
        is_train=True,
        mask_on=False,
        img_format="RGB",
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,  # larger images: one-line error, not 2.5 GB
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        augmentation_with_crop=None,
        is_train=False,
        mask_on=False,
        img_format="RGB",
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    ),
    num_workers=4,
)

# COCO AP plus the paper's AR and oLRP columns. use_fast_impl=True: our vectorised COCOeval
# (pycocotools' numbers to the last bit, ~19x faster at COCO scale); False: pycocotools itself,
# the metric of record. The results go to <train.output_dir>/inference/coco_instances_results.json.
dataloader.evaluator = L(RankDETRCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=True,
    output_dir="${...train.output_dir}/inference",
)
