"""Data: the bundled synthetic shapes dataset, dataset registration (shapes, COCO 2017, any
COCO-format data) with validating loaders, and the DETR dataset mapper."""

from rankdetr.data.datasets import (
    DatasetFormatError,
    load_coco_json_checked,
    num_classes_of,
    register_coco_format,
    register_shapes_dataset,
)
from rankdetr.data.mapper import DetrDatasetMapper
from rankdetr.data.synthetic import SHAPES_CATEGORIES, generate_shapes_dataset

__all__ = [
    "SHAPES_CATEGORIES",
    "DatasetFormatError",
    "DetrDatasetMapper",
    "generate_shapes_dataset",
    "load_coco_json_checked",
    "num_classes_of",
    "register_coco_format",
    "register_shapes_dataset",
]

# The bundled dataset is always available by name, like detectron2's builtin datasets; its files
# are generated the first time it is loaded, not here.
register_shapes_dataset()
