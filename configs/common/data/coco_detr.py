"""COCO 2017 with the DETR / Rank-DETR augmentations (paper Sec. 4.1, detrex recipe).

Train: random flip; then either resize the shorter side to one of 480..800 (step 32, max 1333), or
resize to 400/500/600, crop 384-600, and resize as before. Test: shorter side 800, max 1333.
The images are read from $DETECTRON2_DATASETS/coco (see README).
"""

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

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        min_sizes=tuple(range(480, 801, 32)),
        max_size=1333,
        crop_resize_sizes=(400, 500, 600),
        crop_size=(384, 600),
        image_format="RGB",
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,  # larger images: one-line error, not 2.5 GB
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        test_size=800,
        max_size=1333,
        image_format="RGB",
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    ),
    num_workers=4,
)

# COCO AP plus the paper's AR and oLRP columns. oLRP needs pycocotools' own (Python) COCOeval;
# detectron2's fast evaluator also needs C++ ops we don't build.
dataloader.evaluator = L(RankDETRCOCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=False, output_dir=None
)
