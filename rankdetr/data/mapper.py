"""Dataset dict -> model input, with the DETR augmentations (the recipe of DETR, Deformable DETR,
H-DETR and Rank-DETR).

Training picks, per image and with probability `crop_probability` (0.5 in the recipe), one of:

(a) random flip; resize the shorter side to one of `min_sizes` (longer side <= `max_size`);
(b) random flip; resize the shorter side to one of `crop_resize_sizes`; crop a random
    `crop_size`-range rectangle (height and width each uniform in the range, at most the image);
    then resize as in (a).

Evaluation resizes the shorter side to `test_size` (longer side <= `max_size`).

Usable from a LazyConfig, e.g.
`L(DetrDatasetMapper)(is_train=True, min_sizes=(128, 144, 160), max_size=256, ...)`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from rankdetr.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, read_image

__all__ = [
    "DetrDatasetMapper",
    "build_detr_augmentations",
    "build_detr_crop_augmentations",
    "build_detr_test_augmentations",
]

DETR_MIN_SIZES = tuple(range(480, 801, 32))


def _random_flip(random_flip: str) -> list[T.Augmentation]:
    if random_flip == "none":
        return []
    if random_flip not in ("horizontal", "vertical"):
        raise ValueError(
            f"random_flip must be 'horizontal', 'vertical' or 'none', got {random_flip!r}"
        )
    return [
        T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")
    ]


def build_detr_augmentations(
    min_sizes: Sequence[int] = DETR_MIN_SIZES, max_size: int = 1333, random_flip: str = "horizontal"
) -> list[T.Augmentation]:
    """List (a): flip, then resize the shorter side to a random choice of `min_sizes`."""
    resize = T.ResizeShortestEdge(tuple(min_sizes), max_size=max_size, sample_style="choice")
    return [*_random_flip(random_flip), resize]


def build_detr_crop_augmentations(
    min_sizes: Sequence[int] = DETR_MIN_SIZES,
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    random_flip: str = "horizontal",
) -> list[T.Augmentation]:
    """List (b): flip, resize to one of `crop_resize_sizes`, crop a rectangle whose height and
    width are each drawn from the `crop_size` range (capped by the image), resize as (a)."""
    return [
        *_random_flip(random_flip),
        T.ResizeShortestEdge(tuple(crop_resize_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        T.ResizeShortestEdge(tuple(min_sizes), max_size=max_size, sample_style="choice"),
    ]


def build_detr_test_augmentations(test_size: int = 800, max_size: int = 1333) -> list:
    """Evaluation: resize the shorter side to `test_size`, the longer to at most `max_size`."""
    return [T.ResizeShortestEdge(test_size, max_size=max_size)]


class DetrDatasetMapper:
    """Reads an image and its annotations and augments them (DETR recipe, see module doc).

    Input: a detectron2 dataset dict (file_name, height, width, image_id, annotations with bbox,
    bbox_mode, category_id, optional iscrowd).

    Output dict:
        image: (3, H', W') uint8 tensor, RGB (or `image_format`), augmented;
        instances: Instances of size (H', W') with gt_boxes (XYXY in augmented pixels) and
            gt_classes (int64); crowd annotations and boxes emptied by a crop are dropped.
            Present whenever the input has annotations (also at evaluation);
        height, width: the original image size (predictions are rescaled to it);
        image_id, file_name: passed through.
    """

    def __init__(
        self,
        *,
        is_train: bool,
        min_sizes: Sequence[int] = DETR_MIN_SIZES,
        max_size: int = 1333,
        crop_resize_sizes: Sequence[int] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        crop_probability: float = 0.5,
        test_size: int = 800,
        random_flip: str = "horizontal",
        image_format: str = "RGB",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        """
        Args:
            is_train: training (random augmentations) or evaluation (fixed resize).
            min_sizes: shorter-side choices of the final resize in training.
            max_size: cap on the longer side, in training and evaluation.
            crop_resize_sizes: shorter-side choices before the crop.
            crop_size: (min, max) height and width of the crop, in pixels.
            crop_probability: chance of the crop list (b) instead of (a).
            test_size: shorter side in evaluation.
            random_flip: "horizontal", "vertical" or "none".
            image_format: "RGB" (the models' order) or "BGR"; grayscale, palette and RGBA files
                are converted (alpha dropped).
            max_image_pixels: images with more pixels are refused, naming the file, before
                their pixels are decoded (None: no limit).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not 0.0 <= crop_probability <= 1.0:
            raise ValueError(f"crop_probability must be in [0, 1], got {crop_probability}")
        self.is_train = is_train
        self.image_format = image_format
        self.max_image_pixels = max_image_pixels
        self.crop_probability = crop_probability
        if is_train:
            self.augmentations = build_detr_augmentations(min_sizes, max_size, random_flip)
            self.crop_augmentations = build_detr_crop_augmentations(
                min_sizes, max_size, crop_resize_sizes, crop_size, random_flip
            )
        else:
            self.augmentations = build_detr_test_augmentations(test_size, max_size)
            self.crop_augmentations = []

    def __repr__(self) -> str:
        lines = [f"DetrDatasetMapper(is_train={self.is_train}, image_format={self.image_format}"]
        lines.append(f"  augmentations={self.augmentations}")
        if self.is_train:
            lines.append(f"  with probability {self.crop_probability}: {self.crop_augmentations}")
        return "\n".join(lines) + ")"

    def _choose_augmentations(self) -> list[T.Augmentation]:
        # The draws (here and in detectron2's augmentations) come from NumPy's global generator.
        # The training loader (rankdetr.data.samplers) seeds it per sample from the run's seed
        # and the sample's position in the data stream, so a resumed run augments alike.
        if self.is_train and np.random.rand() < self.crop_probability:
            return self.crop_augmentations
        return self.augmentations

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # the loader hands out the same dicts each epoch
        image = read_image(
            dataset_dict["file_name"],
            self.image_format,
            f"image_id {dataset_dict.get('image_id')}",
            self.max_image_pixels,
        )
        utils.check_image_size(dataset_dict, image)
        original_height, original_width = image.shape[:2]
        augmented = T.AugInput(image)
        transforms = T.AugmentationList(self._choose_augmentations())(augmented)
        image = augmented.image
        result = {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": dataset_dict.get("height", original_height),
            "width": dataset_dict.get("width", original_width),
            "image_id": dataset_dict.get("image_id"),
            "file_name": dataset_dict["file_name"],
        }
        if "annotations" in dataset_dict:
            result["instances"] = _transformed_instances(
                dataset_dict["annotations"], transforms, image.shape[:2]
            )
        return result


def _transformed_instances(annotations: list[dict], transforms, image_size: tuple[int, int]):
    """Instances (gt_boxes, gt_classes) of the non-crowd annotations after `transforms`, without
    the boxes that a crop left empty."""
    transformed = [
        utils.transform_instance_annotations(_with_float_box(annotation), transforms, image_size)
        for annotation in annotations
        if annotation.get("iscrowd", 0) == 0
    ]
    instances = utils.annotations_to_instances(transformed, image_size)
    return utils.filter_empty_instances(instances)


def _with_float_box(annotation: dict) -> dict:
    # detectron2's transforms scale box arrays in place: integer boxes would be truncated at
    # every resize.
    return {**annotation, "bbox": [float(value) for value in annotation["bbox"]]}
