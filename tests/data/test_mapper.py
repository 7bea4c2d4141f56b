"""DetrDatasetMapper: reading, augmenting and converting dataset dicts, with detrex's arguments
(lists of detectron2 augmentations) from the shipped configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from rankdetr.data.datasets import load_coco_json_checked
from rankdetr.data.mapper import DetrDatasetMapper
from rankdetr.data.synthetic import generate_shapes_dataset, shapes_split_paths
from rankdetr.engine.runner import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = str(CONFIGS / "demo" / "rank_detr_r18_shapes.py")
WHITE_BOX = (30, 10, 50, 26)  # x0, y0, x1, y1 of the white rectangle in the test image


def eval_mapper(short_edge: int, max_size: int = 1333) -> DetrDatasetMapper:
    """An evaluation mapper that resizes the shorter side to `short_edge`."""
    return DetrDatasetMapper([T.ResizeShortestEdge(short_edge, max_size=max_size)], is_train=False)


def small_train_mapper(crop_probability: float = 0.5) -> DetrDatasetMapper:
    """The DETR recipe at 64-96 px: flip + resize, or flip + resize + crop + resize."""
    final_resize = T.ResizeShortestEdge((64, 80, 96), max_size=160, sample_style="choice")
    return DetrDatasetMapper(
        augmentation=[T.RandomFlip(), final_resize],
        augmentation_with_crop=[
            T.RandomFlip(),
            T.ResizeShortestEdge((64, 96), sample_style="choice"),
            T.RandomCrop("absolute_range", (32, 64)),
            final_resize,
        ],
        crop_probability=crop_probability,
    )


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
    mapper = eval_mapper(80, max_size=1000)
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
    output = eval_mapper(80, max_size=90)(rectangle_image)
    assert output["image"].shape == (3, 60, 90)


@pytest.mark.parametrize("crop_probability", [0.0, 0.5, 1.0])
def test_train_boxes_follow_the_pixels_through_flips_resizes_and_crops(
    rectangle_image, crop_probability
):
    np.random.seed(0)
    mapper = small_train_mapper(crop_probability)
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
    output = eval_mapper(10, max_size=100)(record)
    assert output["image"].shape == (3, 10, 20)
    expected = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(output["image"].numpy(), expected)
    assert "instances" not in output  # no annotations given: none produced


def test_images_without_annotations_give_empty_instances(rectangle_image):
    rectangle_image["annotations"] = []
    for mapper in (small_train_mapper(), eval_mapper(64)):
        output = mapper(rectangle_image)
        instances = output["instances"]
        assert len(instances) == 0
        assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.shape == (0,)


def test_crowd_annotations_are_dropped(rectangle_image):
    rectangle_image["annotations"][0]["iscrowd"] = 1
    output = eval_mapper(40)(rectangle_image)
    assert len(output["instances"]) == 0


def test_size_mismatch_with_the_dataset_dict_is_an_error(rectangle_image):
    rectangle_image["width"] = 61
    with pytest.raises(Exception, match="Mismatched image shape"):
        eval_mapper(800)(rectangle_image)


def test_coco_config_holds_the_detr_recipe_as_detrex_writes_it():
    dataloader = LazyConfig.load(str(CONFIGS / "common" / "data" / "coco_detr.py")).dataloader
    train = instantiate(dataloader.train.mapper)
    assert [type(a) for a in train.augmentation] == [T.RandomFlip, T.ResizeShortestEdge]
    resize = train.augmentation[1]
    assert tuple(resize.short_edge_length) == tuple(range(480, 801, 32))
    assert resize.max_size == 1333 and not resize.is_range
    crop_list = train.augmentation_with_crop
    assert [type(a) for a in crop_list] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    assert tuple(crop_list[1].short_edge_length) == (400, 500, 600)
    assert crop_list[2].crop_type == "absolute_range"
    assert tuple(crop_list[2].crop_size) == (384, 600)
    assert train.crop_probability == 0.5 and train.img_format == "RGB"
    test = instantiate(dataloader.test.mapper)
    (test_resize,) = test.augmentation
    assert tuple(test_resize.short_edge_length) == (800, 800) and test_resize.max_size == 1333
    assert test.augmentation_with_crop is None


def test_demo_config_mapper_sets_the_final_resize_of_both_lists(tmp_path):
    """The demo's train mapper, instantiated from the config and an override of one list
    element, maps a shapes image to the demo's sizes without random crops."""
    cfg = load_config(
        DEMO_CONFIG, ["dataloader.train.mapper.augmentation_with_crop.2.crop_size=[90,100]"]
    )
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert "DetrDatasetMapper(is_train=True" in repr(mapper) and mapper.crop_probability == 0.0
    assert tuple(mapper.augmentation_with_crop[2].crop_size) == (90, 100)
    for final_resize in (mapper.augmentation[-1], mapper.augmentation_with_crop[-1]):
        assert tuple(final_resize.short_edge_length) == (128, 144, 160)
        assert final_resize.max_size == 224
    json_file = generate_shapes_dataset(tmp_path, "train", 2, seed=3)
    record, _ = load_coco_json_checked(json_file, shapes_split_paths(tmp_path, "train")[1])
    np.random.seed(1)
    short_sides = {min(mapper(record)["image"].shape[1:]) for _ in range(30)}
    assert short_sides == {128, 144, 160}


def test_mapper_is_built_from_a_lazy_config_with_lazy_augmentations():
    config = L(DetrDatasetMapper)(
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=(64,), sample_style="choice")],
        augmentation_with_crop=None,
        is_train=True,
        img_format="BGR",
    )
    mapper = instantiate(config)
    assert isinstance(mapper, DetrDatasetMapper) and mapper.img_format == "BGR"
    assert [type(a) for a in mapper.augmentation] == [T.ResizeShortestEdge]


def test_bgr_format_reverses_the_channels(tmp_path):
    file_name = tmp_path / "orange.png"
    Image.new("RGB", (20, 10), (200, 100, 50)).save(file_name)
    record = {"file_name": str(file_name), "height": 10, "width": 20, "image_id": 1}
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(10)], is_train=False, img_format="BGR")
    assert mapper(record)["image"][:, 0, 0].tolist() == [50, 100, 200]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"img_format": "YUV"}, "img_format must be 'RGB' or 'BGR'"),
        ({"crop_probability": 1.5}, "crop_probability must be in"),
        ({"mask_on": True}, "boxes only"),
        ({"is_train": False, "augmentation_with_crop": [T.RandomFlip()]}, "training only"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DetrDatasetMapper(**{"augmentation": [T.RandomFlip()], **kwargs})


def test_an_augmentation_that_is_not_one_is_named():
    not_instantiated = {"_target_": "T.RandomFlip"}  # a config dict, not an augmentation
    with pytest.raises(TypeError, match=r"augmentation_with_crop\[1\] is a dict"):
        DetrDatasetMapper([T.RandomFlip()], [T.RandomFlip(), not_instantiated])
    with pytest.raises(TypeError, match="must be a list of detectron2 augmentations"):
        DetrDatasetMapper(T.RandomFlip())


def test_maps_the_generated_shapes_dataset(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "val", 4, seed=2)
    dicts = load_coco_json_checked(json_file, shapes_split_paths(tmp_path, "val")[1])
    mapper = eval_mapper(128, max_size=256)
    for record in dicts:
        output = mapper(record)
        assert min(output["image"].shape[1:]) == 128
        assert len(output["instances"]) == len(record["annotations"])
