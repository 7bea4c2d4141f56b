"""The bundled shapes dataset (generated on first use, see rankdetr/data/synthetic.py): the COCO
data config with its names, and the DETR augmentations scaled to its 128-160 px images."""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .coco_detr import dataloader

SHAPES_SHORT_EDGES = (128, 144, 160, 176)

dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentation = [
    L(T.RandomFlip)(),
    L(T.ResizeShortestEdge)(
        short_edge_length=SHAPES_SHORT_EDGES, max_size=256, sample_style="choice"
    ),
]
dataloader.train.mapper.augmentation_with_crop = [
    L(T.RandomFlip)(),
    L(T.ResizeShortestEdge)(short_edge_length=(128, 160), sample_style="choice"),
    L(T.RandomCrop)(crop_type="absolute_range", crop_size=(96, 160)),
    L(T.ResizeShortestEdge)(
        short_edge_length=SHAPES_SHORT_EDGES, max_size=256, sample_style="choice"
    ),
]
dataloader.train.mapper.crop_probability = 0.3
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2

dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentation = [L(T.ResizeShortestEdge)(short_edge_length=160, max_size=256)]
dataloader.test.num_workers = 2
