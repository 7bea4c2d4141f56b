"""DetrDatasetMapper: reading, augmenting and converting dataset dicts."""

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from rankdetr.data.datasets import load_coco_json_checked
from rankdetr.data.mapper import (
    DetrDatasetMapper,
    build_detr_augmentations,
    build_detr_crop_augmentations,
)
from rankdetr.data.synthetic import generate_shapes_dataset, shapes_split_paths

SMALL_TRAIN = {
    "min_sizes": (64, 80, 96),
    "max_size": 160,
    "crop_resize_sizes": (64, 96),
    "crop_size": (32, 64),
}
WHITE_BOX = (30, 10, 50, 26)  # x0, y0, x1, y1 of the white rectangle in the test image


@pytest.fixture
def rectangle_image(tmp_path):
    """A 60x40 black RGB image with a white rectangle, and its dataset dict (box in XYWH)."""
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    x0, y0, x1, y1 = WHITE_BOX
    pixels[y0:y1, x0:x1] = 255
    file_name = tmp_path / "rectangle.png"
    Image.fromarray(pixels).save(file_name)
    record = {
        "file_name": str(file_name),
        "height": 40,
        "width": 60,
        "image_id": 7,
        "annotations": [
            # integer XYWH box: resizes must not truncate it
            {"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2}
        ],
    }
    return record


def _bright_extent(image: torch.Tensor) -> list[float]:
    """[x0, y0, x1, y1] of the pixels brighter than mid-grey in a (3, H, W) image."""
    rows, cols = np.nonzero(image.numpy().mean(axis=0) > 127)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_eval_resizes_and_scales_the_boxes(rectangle_image):
    mapper = DetrDatasetMapper(is_train=False, test_size=80, max_size=1000)
    output = mapper(rectangle_image)
    assert output["image"].dtype == torch.uint8 and output["image"].shape == (3, 80, 120)
    assert (output["height"], output["width"], output["image_id"]) == (40, 60, 7)
    assert output["file_name"] == rectangle_image["file_name"]
    instances = output["instances"]
    assert instances.image_size == (80, 120)
    assert instances.gt_boxes.tensor.tolist() == [[60.0, 20.0, 100.0, 52.0]]
    assert instances.gt_classes.tolist() == [2] and instances.gt_classes.dtype == torch.int64
    assert "annotations" in rectangle_image  # the input dict is left unchanged


def test_eval_max_size_caps_the_longer_side(rectangle_image):
    output = DetrDatasetMapper(is_train=False, test_size=80, max_size=90)(rectangle_image)
    assert output["image"].shape == (3, 60, 90)


@pytest.mark.parametrize("crop_probability", [0.0, 0.5, 1.0])
def test_train_boxes_follow_the_pixels_through_flips_resizes_and_crops(
    rectangle_image, crop_probability
):
    np.random.seed(0)
    mapper = DetrDatasetMapper(is_train=True, crop_probability=crop_probability, **SMALL_TRAIN)
    short_sides, left_halves, dropped = set(), set(), 0
    for _ in range(40):
        output = mapper(rectangle_image)
        image, instances = output["image"], output["instances"]
        height, width = image.shape[1:]
        assert instances.image_size == (height, width)
        if crop_probability == 0.0:
            short_sides.add(min(height, width))
        if len(instances) == 0:  # the crop missed the rectangle
            dropped += 1
            assert (image.float().mean(dim=0) > 127).sum() == 0
            continue
        box = instances.gt_boxes.tensor[0].tolist()
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        assert np.allclose(box, _bright_extent(image), atol=1.5)  # bilinear resize blurs edges
        left_halves.add(box[0] + box[2] < width)
    assert left_halves == {True, False}  # flipped and not flipped
    if crop_probability == 0.0:
        assert short_sides == {64, 80, 96} and dropped == 0
    if crop_probability == 1.0:
        assert dropped > 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grayscale_palette_and_alpha_images_become_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    image = rgb.convert(mode)
    file_name = tmp_path / f"image_{mode}.png"
    image.save(file_name)
    record = {"file_name": str(file_name), "height": 10, "width": 20, "image_id": 1}
    output = DetrDatasetMapper(is_train=False, test_size=10, max_size=100)(record)
    assert output["image"].shape == (3, 10, 20)
    expected = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(output["image"].numpy(), expected)
    assert "instances" not in output  # no annotations given: none produced


def test_images_without_annotations_give_empty_instances(rectangle_image):
    rectangle_image["annotations"] = []
    for is_train in (True, False):
        output = DetrDatasetMapper(is_train=is_train, **SMALL_TRAIN)(rectangle_image)
        instances = output["instances"]
        assert len(instances) == 0
        assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.shape == (0,)


def test_crowd_annotations_are_dropped(rectangle_image):
    rectangle_image["annotations"][0]["iscrowd"] = 1
    output = DetrDatasetMapper(is_train=False, test_size=40)(rectangle_image)
    assert len(output["instances"]) == 0


def test_size_mismatch_with_the_dataset_dict_is_an_error(rectangle_image):
    rectangle_image["width"] = 61
    with pytest.raises(Exception, match="Mismatched image shape"):
        DetrDatasetMapper(is_train=False)(rectangle_image)


def test_detr_recipe_defaults():
    assert [type(a) for a in build_detr_augmentations()] == [T.RandomFlip, T.ResizeShortestEdge]
    resize = build_detr_augmentations()[1]
    assert tuple(resize.short_edge_length) == tuple(range(480, 801, 32))
    assert resize.max_size == 1333 and not resize.is_range
    crop_list = build_detr_crop_augmentations()
    assert [type(a) for a in crop_list] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    assert tuple(crop_list[1].short_edge_length) == (400, 500, 600)
    assert crop_list[2].crop_type == "absolute_range" and tuple(crop_list[2].crop_size) == (
        384,
        600,
    )
    test_resize = DetrDatasetMapper(is_train=False).augmentations[0]
    assert tuple(test_resize.short_edge_length) == (800, 800) and test_resize.max_size == 1333


def test_mapper_is_built_from_a_lazy_config():
    config = L(DetrDatasetMapper)(is_train=True, random_flip="none", **SMALL_TRAIN)
    mapper = instantiate(config)
    assert isinstance(mapper, DetrDatasetMapper) and mapper.is_train
    assert [type(a) for a in mapper.augmentations] == [T.ResizeShortestEdge]
    assert "DetrDatasetMapper(is_train=True" in repr(mapper)


@pytest.mark.parametrize(
    "kwargs",
    [{"image_format": "YUV"}, {"crop_probability": 1.5}, {"random_flip": "diagonal"}],
)
def test_invalid_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        DetrDatasetMapper(is_train=True, **kwargs)


def test_maps_the_generated_shapes_dataset(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "val", 4, seed=2)
    dicts = load_coco_json_checked(json_file, shapes_split_paths(tmp_path, "val")[1])
    mapper = DetrDatasetMapper(is_train=False, test_size=128, max_size=256)
    for record in dicts:
        output = mapper(record)
        assert min(output["image"].shape[1:]) == 128
        assert len(output["instances"]) == len(record["annotations"])
