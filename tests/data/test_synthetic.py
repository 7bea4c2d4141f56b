"""The bundled shapes dataset: deterministic, valid COCO, varied sizes, limited occlusion."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rankdetr.data import synthetic
from rankdetr.data.synthetic import (
    SHAPES_CATEGORIES,
    generate_shapes_dataset,
    render_shapes_image,
    shapes_split_paths,
)

# sha256 of render_shapes_image(7, 0..3) (pixels, sizes and annotations). If you changed the
# generator on purpose, bump synthetic.GENERATOR_VERSION and update this value.
RECORDED_DIGEST = "be826cee108b31b0de14588aa570632eff71c7deba3c1b6bdba4234de4ab2106"


def _digest_of_renders(seed: int, count: int) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        pixels, shapes = render_shapes_image(seed, index)
        digest.update(repr(pixels.shape).encode() + pixels.tobytes())
        digest.update(json.dumps([shape.__dict__ for shape in shapes]).encode())
    return digest.hexdigest()


def _file_bytes(folder: Path) -> dict:
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder): path.read_bytes() for path in files}


def test_two_generations_are_byte_identical(tmp_path):
    generate_shapes_dataset(tmp_path / "a", "val", 6, seed=2)
    generate_shapes_dataset(tmp_path / "b", "val", 6, seed=2)
    first, second = _file_bytes(tmp_path / "a" / "val"), _file_bytes(tmp_path / "b" / "val")
    assert len(first) == 6 + 2  # images, JSON, completion marker
    assert first == second


def test_renders_match_the_recorded_digest():
    assert _digest_of_renders(seed=7, count=4) == RECORDED_DIGEST


def test_seeds_and_indices_give_different_images():
    assert not np.array_equal(render_shapes_image(1, 0)[0], render_shapes_image(2, 0)[0])
    assert not np.array_equal(render_shapes_image(1, 0)[0], render_shapes_image(1, 1)[0])


def test_json_is_valid_coco_with_boxes_inside_the_images(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "train", 24, seed=1)
    assert json_file == shapes_split_paths(tmp_path, "train")[0]
    image_root = shapes_split_paths(tmp_path, "train")[1]
    data = json.loads(json_file.read_text())
    assert data["categories"] == SHAPES_CATEGORIES
    assert len({category["name"] for category in data["categories"]}) == 5
    images = {image["id"]: image for image in data["images"]}
    assert len(images) == 24
    for image in images.values():
        with Image.open(image_root / image["file_name"]) as file:
            assert file.size == (image["width"], image["height"]) and file.mode == "RGB"
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for annotation in data["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < annotation["area"] <= w * h
        assert annotation["category_id"] in {1, 2, 3, 4, 5} and annotation["iscrowd"] == 0
    objects_per_image = Counter(annotation["image_id"] for annotation in data["annotations"])
    assert set(objects_per_image) == set(images) and max(objects_per_image.values()) <= 6


def test_boxes_are_tight_to_the_drawn_pixels(monkeypatch):
    # Without the final noise a shape keeps its exact colour, which no clutter can have
    # (shapes are brighter), so its pixels can be found again in the image.
    monkeypatch.setattr(synthetic, "FINE_NOISE", 0)
    checked = 0
    for index in range(30):
        pixels, shapes = render_shapes_image(3, index)
        for shape in shapes:
            x, y, w, h = shape.bbox
            colours, counts = np.unique(
                pixels[y : y + h, x : x + w].reshape(-1, 3), axis=0, return_counts=True
            )
            colour = colours[counts.argmax()]
            rows, cols = np.nonzero((pixels == colour).all(axis=2))
            assert len(rows) == shape.visible_area
            if shape.visible_area == shape.area:  # unoccluded: the box is the pixels' extent
                assert (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1) == shape.bbox
                checked += 1
            else:  # occluded: the visible pixels lie inside the full-shape box
                assert x <= cols.min() and cols.max() < x + w
                assert y <= rows.min() and rows.max() < y + h
    assert checked > 50


def test_sizes_classes_overlaps_and_occlusion_vary():
    renders = [render_shapes_image(5, index) for index in range(120)]
    shapes = [shape for _, image_shapes in renders for shape in image_shapes]
    assert {len(image_shapes) for _, image_shapes in renders} == set(range(1, 7))
    assert len({pixels.shape for pixels, _ in renders}) > 3  # several sizes and aspect ratios
    assert {shape.category_id for shape in shapes} == {1, 2, 3, 4, 5}
    longest_sides = [max(shape.bbox[2:]) for shape in shapes]
    assert min(longest_sides) <= 10 and max(longest_sides) >= 60
    areas = [shape.area for shape in shapes]
    assert min(areas) < 32**2 <= max(areas)  # COCO "small" and "medium" objects
    # Shapes overlap, but every one keeps >= 60 % of its pixels visible.
    assert sum(shape.visible_area < shape.area for shape in shapes) > 10
    assert all(5 * shape.visible_area >= 3 * shape.area for shape in shapes)


@pytest.mark.parametrize("split", ["", "a/b", ".hidden", ".."])
def test_rejects_splits_that_are_not_plain_names(tmp_path, split):
    with pytest.raises(ValueError, match="plain folder name"):
        generate_shapes_dataset(tmp_path, split, 1, seed=0)
