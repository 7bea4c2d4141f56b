"""A camera JPEG stored 40 wide x 30 high with EXIF orientation 6 (rotate 90 degrees clockwise)
is displayed, and decoded by rankdetr's reader, 30 wide x 40 high. A JSON that gives the stored
size is refused with one line naming the file, both sizes and the orientation (before: a
detectron2 SizeMismatchError traceback that named neither the orientation nor the fix)."""

import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image

from rankdetr.data import DetrDatasetMapper, register_coco_format
from rankdetr.data.image_io import ImageSizeError, exif_orientation
from rankdetr.errors import UserError
from tests.data.test_annotation_integrity import last_error_line, train_net

STORED = (40, 30)  # width, height of the pixels in the file
DISPLAYED = (30, 40)  # after EXIF orientation 6


def write_rotated_jpeg_dataset(folder: Path, json_size: tuple[int, int], orientation=6) -> Path:
    """One JPEG stored at STORED with the given EXIF orientation, one box, and a JSON giving
    `json_size` as the image's width and height."""
    (folder / "images").mkdir(parents=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", STORED, (200, 40, 40)).save(folder / "images" / "photo.jpg", exif=exif)
    width, height = json_size
    data = {
        "images": [{"id": 1, "file_name": "photo.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20],
                         "area": 400, "iscrowd": 0}],  # fmt: skip
        "categories": [{"id": 1, "name": "thing"}],
    }
    json_file = folder / "instances.json"
    json_file.write_text(json.dumps(data))
    return json_file


def load(tmp_path: Path, name: str, json_size, orientation=6) -> dict:
    json_file = write_rotated_jpeg_dataset(tmp_path / name, json_size, orientation)
    register_coco_format(name, json_file, json_file.parent / "images")
    (record,) = DatasetCatalog.get(name)
    return record


def eval_mapper() -> DetrDatasetMapper:
    return DetrDatasetMapper([T.ResizeShortestEdge(32, max_size=64)], is_train=False)


def test_the_stored_size_is_named_with_both_sizes_and_the_orientation(tmp_path):
    record = load(tmp_path, "rotated", json_size=STORED)
    assert exif_orientation(record["file_name"]) == 6
    with pytest.raises(ImageSizeError) as error:
        eval_mapper()(record)
    message = str(error.value)
    assert message.startswith(
        f"Mismatched image shape for image {record['file_name']} (image_id 1): the dataset gives "
        "its size as 40x30 (width x height), but the image decodes to 30x40; that is the file's "
        "stored size, before its EXIF orientation 6 (rotate 90 degrees clockwise) is applied"
    ), message
    assert "set width=30, height=40 in the annotation file" in message
    # A user error (one line from the tools), and still detectron2's error type.
    assert isinstance(error.value, UserError) and isinstance(error.value, SizeMismatchError)


def test_the_displayed_size_is_read_as_it_is(tmp_path):
    record = load(tmp_path, "displayed", json_size=DISPLAYED)
    mapped = eval_mapper()(record)
    assert (mapped["width"], mapped["height"]) == DISPLAYED
    assert tuple(mapped["image"].shape[1:]) == (43, 32)  # upright: the width is the short side


def test_a_wrong_size_without_exif_says_so(tmp_path):
    record = load(tmp_path, "plain", json_size=(41, 30), orientation=None)
    with pytest.raises(ImageSizeError, match=r"decodes to 40x30; the file has no EXIF orientation"):
        eval_mapper()(record)


def test_train_net_ends_with_one_line_naming_the_file_sizes_and_orientation(
    tmp_path, monkeypatch, capsys
):
    json_file = write_rotated_jpeg_dataset(tmp_path / "photos", json_size=STORED)
    register_coco_format("photos", json_file, json_file.parent / "images")
    train_net(monkeypatch, tmp_path, "photos")
    line = last_error_line(capsys)
    image = json_file.parent / "images" / "photo.jpg"
    assert line.startswith(
        f"error: Mismatched image shape for image {image} (image_id 1): the dataset gives its "
        "size as 40x30"
    ), line
    assert "decodes to 30x40" in line and "EXIF orientation 6" in line
