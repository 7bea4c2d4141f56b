"""Bad and unusual data: image files (missing, unreadable, grayscale, RGBA, 16-bit), images without
annotations, and an image with 500 objects trained for one step."""

import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from rankdetr.data.datasets import load_coco_json_checked, register_coco_format
from rankdetr.data.image_io import ImageReadError, read_image
from rankdetr.data.mapper import DetrDatasetMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions
from tests.modeling.test_rank_detr import tiny_model


def _pixels(height=6, width=5) -> np.ndarray:
    """(H, W, 3) uint8 with a different value in every pixel and channel."""
    return (np.arange(height * width * 3).reshape(height, width, 3) * 7 % 256).astype(np.uint8)


# --- reading image files ---------------------------------------------------------------------


def test_rgb_file_reads_as_rgb_or_bgr(tmp_path):
    pixels = _pixels()
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), pixels)
    bgr = read_image(tmp_path / "x.png", "BGR")
    np.testing.assert_array_equal(bgr, pixels[:, :, ::-1])
    assert bgr.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="'RGB' or 'BGR', got 'HSV'"):
        read_image(tmp_path / "x.png", "HSV")


def test_grayscale_file_becomes_three_equal_channels(tmp_path):
    gray = _pixels()[:, :, 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (6, 5, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_sixteen_bit_grayscale_keeps_its_top_eight_bits(tmp_path):
    values = np.array([[0, 255, 256], [4095, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    expected = np.array([[0, 0, 1], [15, 156, 255]], dtype=np.uint8)  # value // 256
    np.testing.assert_array_equal(image[:, :, 0], expected)
    np.testing.assert_array_equal(image[:, :, 2], expected)


def test_rgba_file_drops_alpha_and_keeps_the_colours(tmp_path):
    pixels = _pixels()
    alpha = np.zeros((6, 5, 1), dtype=np.uint8)  # fully transparent: colours must survive
    alpha[0, 0] = 255
    Image.fromarray(np.concatenate([pixels, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), pixels)


def test_palette_file_is_converted(tmp_path):
    palette_image = Image.fromarray(_pixels()).convert("P")
    palette_image.save(tmp_path / "p.png")
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


def test_missing_file_names_the_file_and_the_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*gone.jpg \(image_id 3\)"):
        read_image(tmp_path / "gone.jpg", entry="image_id 3")


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_file_names_the_file_and_the_entry(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(_pixels(64, 64)).save(path)
        content = path.read_bytes()[:100]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=r"cannot read image .*bad.png \(image_id 9\)"):
        read_image(path, entry="image_id 9")


def _record(tmp_path, image: Image.Image, annotations=()) -> dict:
    image.save(tmp_path / "img.png")
    return {
        "file_name": str(tmp_path / "img.png"),
        "height": image.height,
        "width": image.width,
        "image_id": 12,
        "annotations": list(annotations),
    }


def test_mapper_reads_grayscale_and_rgba_as_three_channels(tmp_path):
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(30, max_size=100)], is_train=False)
    gray = _pixels(30, 40)[:, :, 1]
    output = mapper(_record(tmp_path, Image.fromarray(gray, mode="L")))
    assert output["image"].shape == (3, 30, 40)
    assert torch.equal(output["image"][0], torch.from_numpy(gray))
    rgba = np.concatenate([_pixels(30, 40), np.full((30, 40, 1), 7, np.uint8)], axis=2)
    output = mapper(_record(tmp_path, Image.fromarray(rgba, mode="RGBA")))
    assert torch.equal(output["image"], torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1))


def test_mapper_names_the_missing_or_unreadable_file_and_its_image_id(tmp_path):
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(30, max_size=100)], is_train=False)
    record = _record(tmp_path, Image.fromarray(_pixels(30, 40)))
    (tmp_path / "img.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"img.png \(image_id 12\)"):
        mapper(record)
    (tmp_path / "img.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img.png \(image_id 12\)"):
        mapper(record)


def test_mapper_refuses_a_file_whose_size_disagrees_with_the_json(tmp_path):
    record = _record(tmp_path, Image.fromarray(_pixels(30, 40)))
    record["width"] = 41
    with pytest.raises(SizeMismatchError, match="img.png"):
        DetrDatasetMapper([T.ResizeShortestEdge(30, max_size=100)], is_train=False)(record)


# --- images without annotations ----------------------------------------------------------------


def _write_coco(tmp_path, annotations_per_image: list[int]) -> tuple:
    """A COCO dataset of 40x30 images with the given numbers of 4x4 boxes (category 1)."""
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id, count in enumerate(annotations_per_image):
        Image.new("RGB", (40, 30)).save(image_root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 40, "height": 30})
        for k in range(count):
            box = [k % 9 * 4, k // 9 % 6 * 4, 4, 4]
            annotations.append(
                {"id": len(annotations), "image_id": image_id, "category_id": 1, "bbox": box}
            )
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(data))
    return json_file, image_root


def test_training_drops_images_without_annotations_and_logs_the_count(tmp_path, caplog):
    register_coco_format("with_empty", *_write_coco(tmp_path, [2, 0, 0, 1]))
    with caplog.at_level(logging.INFO, logger="detectron2"):
        train = get_detection_dataset_dicts("with_empty")  # filter_empty=True, as in training
    assert [record["image_id"] for record in train] == [0, 3]
    assert "Removed 2 images with no usable annotations" in caplog.text
    test = get_detection_dataset_dicts("with_empty", filter_empty=False)  # evaluation keeps them
    assert [len(record["annotations"]) for record in test] == [2, 0, 0, 1]


def test_mapper_gives_empty_instances_for_an_image_without_annotations(tmp_path):
    (record,) = load_coco_json_checked(*_write_coco(tmp_path, [0]))
    mapper = DetrDatasetMapper([T.RandomFlip(), T.ResizeShortestEdge(30, max_size=60)])
    output = mapper(record)
    assert len(output["instances"]) == 0 and output["instances"].image_size == (30, 40)


# --- an image with 500 objects -------------------------------------------------------------------


def demo_sized_model(num_classes=5) -> RankDETR:
    """The demo's query counts (50 one-to-one, 150 one-to-many, k=3) on a narrow transformer."""
    return tiny_model(RankOptions(), num_classes, num_queries=50, num_queries_one2many=150,
                      one2many_repeats=3, num_detections=50)  # fmt: skip


def test_500_objects_load_map_and_train_one_step(tmp_path):
    (record,) = load_coco_json_checked(*_write_coco(tmp_path, [500]))
    assert len(record["annotations"]) == 500
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(60, max_size=100)], is_train=True)
    inputs = mapper(record)
    assert len(inputs["instances"]) == 500
    model = demo_sized_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = model([inputs])
    assert all(torch.isfinite(value) for value in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    before = model.query_embedding.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.query_embedding.weight)


def test_50_queries_and_500_targets_match_50_distinct_pairs_normalised_by_500():
    # More targets than queries: every query is matched once, 450 targets stay unmatched, and the
    # box losses are still divided by the number of targets (500), not by the matches (50).
    torch.manual_seed(1)
    model = demo_sized_model(num_classes=3)
    criterion = model.criterion
    logits, boxes = torch.randn(1, 50, 3), torch.rand(1, 50, 4) * 0.5 + 0.25
    target = {"labels": torch.randint(0, 3, (500,)), "boxes": torch.rand(500, 4) * 0.5 + 0.25}
    ((queries, targets),) = criterion.matcher(logits, boxes, [target])
    assert len(queries) == 50 and len(set(queries.tolist())) == 50
    assert len(set(targets.tolist())) == 50 and int(targets.max()) < 500
    losses = criterion({"logits": [logits], "boxes": [boxes]}, [target])
    pred, gt = boxes[0, queries].double(), target["boxes"][targets].double()
    expected_bbox = 5.0 * (pred - gt).abs().sum() / 500
    assert losses["loss_bbox"].item() == pytest.approx(expected_bbox.item(), rel=1e-5)
    # The one-to-many branch: 150 queries against 1500 repeated targets.
    many = criterion(
        {"logits": [logits], "boxes": [boxes]},
        [target],
        {"logits": [torch.randn(1, 150, 3)], "boxes": [torch.rand(1, 150, 4)]},
        one2many_repeats=3,
    )
    assert all(torch.isfinite(v) for v in many.values())


def test_an_image_without_targets_trains_beside_one_with_targets():
    model = demo_sized_model(num_classes=2)
    model.train()
    batch = []
    for boxes in ([], [[4.0, 4.0, 30.0, 20.0]]):
        instances = Instances((32, 48))
        instances.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
        instances.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        batch.append({"image": torch.zeros(3, 32, 48, dtype=torch.uint8), "instances": instances})
    losses = model(batch)
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()


def test_bbox_mode_of_loaded_records_is_xyxy(tmp_path):
    # The mapper relies on it: boxes come out of the loader as absolute XYXY.
    (record,) = load_coco_json_checked(*_write_coco(tmp_path, [3]))
    assert {a["bbox_mode"] for a in record["annotations"]} == {BoxMode.XYXY_ABS}


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((120, 100, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageReadError, match=r"big.png \(image_id 7\) is 100x120 = 12000 pixels"):
        read_image(path, entry="image_id 7", max_pixels=11999)
    assert read_image(path, max_pixels=12000).shape == (120, 100, 3)
    # Pillow's own limit (here a low one a user set) neither warns nor raises: ours decides,
    # and Pillow's setting is left as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert read_image(path, max_pixels=None).shape == (120, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
