"""The bundled shapes dataset (generated on first use, see rankdetr/data/synthetic.py): the COCO
data config with its names, and the DETR augmentations scaled to its 128-160 px images."""

from .coco_detr import dataloader

dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.min_sizes = (128, 144, 160, 176)
dataloader.train.mapper.max_size = 256
dataloader.train.mapper.crop_resize_sizes = (128, 160)
dataloader.train.mapper.crop_size = (96, 160)
dataloader.train.mapper.crop_probability = 0.3
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2

dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.test_size = 160
dataloader.test.mapper.max_size = 256
dataloader.test.num_workers = 2
