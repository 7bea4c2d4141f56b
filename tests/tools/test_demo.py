"""tools/demo.py: inputs (files, directories, globs), drawn PNGs, and bad inputs reported."""

import sys

import numpy as np
import pytest
from PIL import Image

from rankdetr.predictor import Prediction
from tests.conftest import REPO_ROOT, load_tool
from tests.test_predictor import DEMO_CONFIG, TINY_OVERRIDES, save_tiny_checkpoint
from tests.warm_python import run_python

TOOL = REPO_ROOT / "tools" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    return load_tool(TOOL, "demo_tool")


def write_image(path, height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_end_to_end_writes_drawn_pngs_and_reports_the_unreadable_image(tmp_path):
    save_tiny_checkpoint(tmp_path / "tiny.pth")
    (tmp_path / "dir").mkdir()
    (tmp_path / "glob").mkdir()
    first = write_image(tmp_path / "dir" / "a.png", 60, 90)
    write_image(tmp_path / "dir" / "b.jpg", 80, 70, seed=1)
    (tmp_path / "dir" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "glob" / "c.png", 70, 70, seed=2)
    (tmp_path / "glob" / "broken.png").write_bytes(b"\x89PNG broken")
    result = run_python(
        [sys.executable, str(TOOL), "--config-file", DEMO_CONFIG,
         "--checkpoint", str(tmp_path / "tiny.pth"),
         "--input", str(tmp_path / "dir"), str(tmp_path / "glob" / "*.png"),
         "--output", str(tmp_path / "out"), "--score-threshold", "0", *TINY_OVERRIDES],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken.png" in result.stderr and "1 of 4" in result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.png", "b.png", "c.png"]
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png").convert("RGB"))
    assert drawn.shape == first.shape  # drawn on the image as given, not the resized one
    assert (drawn != first).any(axis=2).mean() > 0.01  # boxes and labels were drawn


def test_missing_checkpoint_and_no_inputs_fail_with_a_message(demo, tmp_path, capsys):
    write_image(tmp_path / "a.png", 40, 40)
    argv = ["--config-file", DEMO_CONFIG, "--checkpoint", str(tmp_path / "absent.pth"),
            "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]  # fmt: skip
    assert demo.main(argv) == 1
    assert "absent.pth" in capsys.readouterr().err
    argv[5] = str(tmp_path / "*.jpg")
    assert demo.main(argv) == 1
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inputs_expand_in_order_without_duplicates(demo, tmp_path):
    for name in ("b.png", "a.JPG", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    paths = demo.expand_inputs(
        [str(tmp_path / "missing.png"), str(tmp_path), str(tmp_path / "**" / "*.png")]
    )
    expected = ["missing.png", "a.JPG", "b.png", "sub/a.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == expected
    assert demo.output_names(paths) == ["missing.png", "a.png", "b.png", "a_1.png"]


def test_boxes_are_drawn_where_the_prediction_says(demo):
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    prediction = Prediction(
        boxes=np.array([[10.0, 40.0, 60.0, 90.0]], dtype=np.float32),
        scores=np.array([0.9], dtype=np.float32),
        classes=np.array([2]),
        class_names=["triangle"],
        image_size=(100, 120),
    )
    drawn = np.asarray(demo.draw_prediction(image, prediction))
    assert drawn.shape == image.shape
    colour = demo.class_colour(2)
    for x, y in [(10, 65), (60, 65), (35, 90)]:  # left, right and bottom edges
        pixel = drawn[y, x].astype(np.float64)
        cosine = pixel @ colour / (np.linalg.norm(pixel) * np.linalg.norm(colour))
        assert cosine > 0.99, (x, y, pixel)  # the class's colour (blended with the image)
    assert not drawn[60:85, 20:50].any()  # inside the box, below the label: untouched
    assert not drawn[55:, 70:].any() and not drawn[:35].any()  # away from box and label
    assert drawn[42:52, 14:58].any()  # the label, inside the box's top


def test_classes_get_distinct_colours(demo):
    colours = [tuple(demo.class_colour(label)) for label in range(5)]
    assert len(set(colours)) == 5


def test_an_image_above_the_pixel_limit_is_skipped_and_named(tmp_path):
    """`dataloader.test.mapper.max_image_pixels` (here 5000): the 60x90 image is refused before
    decoding and named, the 70x70 one is drawn, and the exit status says one failed."""
    save_tiny_checkpoint(tmp_path / "tiny.pth")
    write_image(tmp_path / "large.png", 60, 90)
    write_image(tmp_path / "small.png", 70, 70, seed=1)
    result = run_python(
        [sys.executable, str(TOOL), "--config-file", DEMO_CONFIG,
         "--checkpoint", str(tmp_path / "tiny.pth"), "--input", str(tmp_path / "*.png"),
         "--output", str(tmp_path / "out"), *TINY_OVERRIDES,
         "dataloader.test.mapper.max_image_pixels=5000"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "large.png is 90x60 = 5400 pixels, above the limit of 5000" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small.png"]
