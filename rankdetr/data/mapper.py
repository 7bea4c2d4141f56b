"""Dataset dict -> model input, with augmentations given as lists of detectron2 transforms.

The mapper takes detrex's arguments, so a detrex data config ports as it is:

- `augmentation`: the list applied to every image (evaluation: just the resize);
- `augmentation_with_crop`: an alternative list (training only), chosen per image with
  probability `crop_probability` (detrex: always 0.5) instead of `augmentation`;
- `img_format`: "RGB" or "BGR", the channel order the model sees.

The DETR recipe (DETR, Deformable DETR, H-DETR, Rank-DETR; configs/common/data/coco_detr.py):
`augmentation` = random flip, resize the shorter side to one of 480..800 (longer side <= 1333);
`augmentation_with_crop` = random flip, resize to 400/500/600, crop a rectangle whose height and
width are each in 384..600, then resize as before. Evaluation resizes the shorter side to 800.

Beyond detrex: images are read by rankdetr's reader (missing or unreadable files and images above
`max_image_pixels` are named in the error; grayscale, palette, 16-bit and RGBA files become 3
channels; a size other than the dataset's is named with the EXIF orientation), integer boxes
are not truncated by the resizes, and annotated evaluation images keep their instances (the
analysis tools compare detections with them).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from rankdetr.data.image_io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_FORMATS,
    check_decoded_size,
    read_image,
)

__all__ = ["DetrDatasetMapper"]

logger = logging.getLogger(__name__)


class DetrDatasetMapper:
    """Reads an image and its annotations and augments them (see the module doc).

    Input: a detectron2 dataset dict (file_name, height, width, image_id, annotations with bbox,
    bbox_mode, category_id, optional iscrowd).

    Output dict:
        image: (3, H', W') uint8 tensor in `img_format`, augmented;
        instances: Instances of size (H', W') with gt_boxes (XYXY in augmented pixels) and
            gt_classes (int64); crowd annotations and boxes emptied by a crop are dropped.
            Present whenever the input has annotations (also at evaluation);
        height, width: the original image size (predictions are rescaled to it);
        image_id, file_name: passed through.
    """

    def __init__(
        self,
        augmentation: Sequence[T.Augmentation | T.Transform],
        augmentation_with_crop: Sequence[T.Augmentation | T.Transform] | None = None,
        is_train: bool = True,
        mask_on: bool = False,
        img_format: str = "RGB",
        crop_probability: float = 0.5,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        """
        Args:
            augmentation: detectron2 augmentations applied in order to every image.
            augmentation_with_crop: another list, used instead of `augmentation` with
                probability `crop_probability` (None: `augmentation` always). Training only.
            is_train: training or evaluation; evaluation takes no `augmentation_with_crop`, so
                that every image is mapped the same way each time.
            mask_on: detrex's switch for instance masks; rankdetr detects boxes only, so True is
                refused.
            img_format: "RGB" (the models' order) or "BGR".
            crop_probability: chance of `augmentation_with_crop` per image.
            max_image_pixels: images with more pixels are refused, naming the file, before
                their pixels are decoded (None: no limit).
        """
        if img_format not in IMAGE_FORMATS:
            raise ValueError(f"img_format must be 'RGB' or 'BGR', got {img_format!r}")
        if mask_on:
            raise ValueError("mask_on=True: rankdetr's models detect boxes only, not masks")
        if not 0.0 <= crop_probability <= 1.0:
            raise ValueError(f"crop_probability must be in [0, 1], got {crop_probability}")
        if augmentation_with_crop is not None and not is_train:
            raise ValueError(
                "augmentation_with_crop is for training only: an evaluation mapper "
                "(is_train=False) must map every image the same way; set it to None"
            )
        self.augmentation = _checked_augmentations(augmentation, "augmentation")
        self.augmentation_with_crop = (
            None
            if augmentation_with_crop is None
            else _checked_augmentations(augmentation_with_crop, "augmentation_with_crop")
        )
        self.is_train = is_train
        self.img_format = img_format
        self.crop_probability = crop_probability
        self.max_image_pixels = max_image_pixels
        logger.info("%r", self)

    def __repr__(self) -> str:
        lines = [
            f"DetrDatasetMapper(is_train={self.is_train}, img_format={self.img_format}",
            f"  augmentation={self.augmentation}",
        ]
        if self.augmentation_with_crop is not None:
            lines.append(
                f"  with probability {self.crop_probability}: {self.augmentation_with_crop}"
            )
        return ",\n".join(lines) + ")"

    def _choose_augmentation(self) -> list[T.Augmentation | T.Transform]:
        # The draws (here and in detectron2's augmentations) come from NumPy's global generator.
        # The training loader (rankdetr.data.samplers) seeds it per sample from the run's seed
        # and the sample's position in the data stream, so a resumed run augments alike.
        if self.augmentation_with_crop is not None and np.random.rand() < self.crop_probability:
            return self.augmentation_with_crop
        return self.augmentation

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # the loader hands out the same dicts each epoch
        entry = f"image_id {dataset_dict.get('image_id')}"
        image = read_image(dataset_dict["file_name"], self.img_format, entry, self.max_image_pixels)
        # Not detectron2's check_image_size: it names neither the EXIF orientation nor the fix.
        check_decoded_size(dataset_dict, image, entry)
        original_height, original_width = image.shape[:2]
        augmented = T.AugInput(image)
        transforms = T.AugmentationList(self._choose_augmentation())(augmented)
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


def _checked_augmentations(augmentations, name: str) -> list[T.Augmentation | T.Transform]:
    """The list as given, refused with the offending position named unless every element is a
    detectron2 Augmentation or Transform (a config that forgot `L(...)` gives dicts here)."""
    if isinstance(augmentations, (str, bytes)) or not isinstance(augmentations, Sequence):
        raise TypeError(f"{name} must be a list of detectron2 augmentations, got "
                        f"{type(augmentations).__name__}")  # fmt: skip
    for index, augmentation in enumerate(augmentations):
        if not isinstance(augmentation, (T.Augmentation, T.Transform)):
            raise TypeError(
                f"{name}[{index}] is a {type(augmentation).__name__}, not a detectron2 "
                "augmentation (write it as L(T.ResizeShortestEdge)(...) in a config)"
            )
    return list(augmentations)


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
