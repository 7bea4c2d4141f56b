"""Running an exported .onnx file (rankdetr/export/runtime.py): the Predictor, tools/demo.py
--onnx and tools/train_net.py --eval-only --onnx give the PyTorch model's detections and AP.

The demo config (random weights, 5 classes) is exported once per session (tests/export/
conftest.py, ~30 s on 2 cores); its weights are saved beside it as a .pth for the PyTorch side
of each comparison.
"""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.warm_python import run_python

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rankdetr.data.synthetic import generate_shapes_dataset  # noqa: E402
from rankdetr.export import OnnxDetector, OnnxInputError  # noqa: E402
from rankdetr.predictor import Predictor  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.export.conftest import OVERRIDES  # noqa: E402

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
NAMES = ["circle", "square", "triangle", "cross", "ring"]
ENV = dict(os.environ)


@pytest.fixture(scope="module")
def exported(demo_onnx_export):
    """(onnx path, pth path) of the demo model, exported once per session (conftest.py)."""
    return demo_onnx_export


@pytest.fixture(scope="module")
def predictors(exported):
    """(PyTorch predictor, ONNX predictor from the file alone) of the same weights."""
    onnx_path, pth_path = exported
    return Predictor(DEMO, pth_path, overrides=OVERRIDES), Predictor(onnx_path, onnx_threads=2)


def shapes_image(tmp_path: Path, index: int = 0) -> Path:
    """A bundled-style shapes image (128-160 px), generated into tmp_path."""
    generate_shapes_dataset(tmp_path / "shapes", "val", 2, seed=3)
    return sorted((tmp_path / "shapes" / "val" / "images").iterdir())[index]


def separated(scores: np.ndarray, gap: float = 1e-4) -> np.ndarray:
    """(D,) descending scores -> (D,) bool: more than `gap` from both neighbours (ties may swap
    places between the two runtimes, so only these are compared one to one)."""
    gaps = np.abs(np.diff(scores))
    return np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf]) > gap


def assert_same_detections(expected, actual):
    assert actual.image_size == expected.image_size and len(actual) == len(expected)
    np.testing.assert_allclose(actual.scores, expected.scores, atol=1e-4, rtol=0)
    keep = separated(expected.scores)
    assert keep.sum() >= len(keep) // 2, "too many near-ties to compare"
    np.testing.assert_array_equal(actual.classes[keep], expected.classes[keep])
    np.testing.assert_allclose(actual.boxes[keep], expected.boxes[keep], atol=0.01, rtol=0)


@pytest.mark.slow
def test_onnx_predictor_matches_the_pytorch_predictor(predictors, tmp_path):
    """Same resize, channel order and rescaling to the original size as the PyTorch path."""
    torch_predictor, onnx_predictor = predictors
    path = shapes_image(tmp_path)
    expected, actual = torch_predictor(path), onnx_predictor(path)
    assert_same_detections(expected, actual)
    assert actual.class_names == [NAMES[c] for c in actual.classes]
    width, height = Image.open(path).size
    assert actual.image_size == (height, width)  # the image as given, not the resized one


def test_onnx_file_alone_gives_the_transform_and_class_names(predictors):
    torch_predictor, onnx_predictor = predictors
    assert onnx_predictor.cfg is None and onnx_predictor.backend == "onnx"
    assert onnx_predictor.thing_classes == NAMES == torch_predictor.thing_classes
    assert onnx_predictor.image_format == torch_predictor.image_format == "RGB"
    (resize,) = onnx_predictor.augmentations
    (expected,) = torch_predictor.augmentations
    assert type(resize) is type(expected)
    assert (resize.short_edge_length, resize.max_size) == (
        expected.short_edge_length,
        expected.max_size,
    )
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    assert_same_detections(torch_predictor(image), onnx_predictor(image))


def test_onnx_with_its_config_also_predicts(exported, predictors):
    onnx_path, _ = exported
    with_config = Predictor(DEMO, onnx_path, overrides=OVERRIDES, onnx_threads=2)
    assert with_config.cfg is not None and with_config.thing_classes == NAMES
    image = np.random.default_rng(1).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert_same_detections(predictors[0](image), with_config(image))


def test_wrong_channel_count_is_one_line_naming_the_file(predictors, exported):
    onnx_path, _ = exported
    _, onnx_predictor = predictors
    one_channel = torch.zeros(1, 160, 160, dtype=torch.uint8)
    with pytest.raises(OnnxInputError) as caught:
        onnx_predictor.model([{"image": one_channel}])
    message = str(caught.value)
    assert "\n" not in message and str(onnx_path) in message
    assert "(1, 1, 160, 160)" in message and "Expected: 3" in message


def test_missing_onnx_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        OnnxDetector(tmp_path / "absent.onnx")


def test_demo_tool_with_onnx_writes_a_drawn_png(exported, tmp_path):
    onnx_path, _ = exported
    image = np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    result = run_python(
        [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--onnx", str(onnx_path),
         "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out"),
         "--score-threshold", "0"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png").convert("RGB"))
    assert drawn.shape == image.shape
    assert (drawn != image).any(axis=2).mean() > 0.01  # boxes and labels were drawn


# --- evaluation: train_net.py --eval-only --onnx against --eval-only of the same weights ------

EVAL_CONFIG = """
from detectron2.config import LazyConfig
from rankdetr.data import register_coco_format

register_coco_format("onnx_pseudo_val", {json!r}, {images!r})
_demo = LazyConfig.load({demo!r})
model, optimizer, lr_multiplier, dataloader, train = (
    _demo[k] for k in ("model", "optimizer", "lr_multiplier", "dataloader", "train")
)
dataloader.test.dataset.names = "onnx_pseudo_val"
dataloader.test.num_workers = 0
model.num_classes = 5
model.encoder_layers = 2  # the exported network (tests/export/conftest.py)
"""


def pseudo_labelled_dataset(root: Path, predictor: Predictor, per_image: int = 6) -> Path:
    """Four shapes images annotated with the model's own top detections, their boxes moved by
    0-30 % of their size: random weights score AP 0 on the true boxes, these give an AP that
    is neither 0 nor 100 and moves with any box or ranking error of the exported model."""
    json_file = generate_shapes_dataset(root, "val", 4, seed=5)
    data = json.loads(json_file.read_text())
    category_ids = [c["id"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    annotations = []
    for image in data["images"]:
        prediction = predictor(str(json_file.parent / "images" / image["file_name"]))
        for rank, (box, label) in enumerate(zip(prediction.boxes, prediction.classes)):
            if rank == per_image:
                break
            x0, y0, x1, y1 = (float(v) for v in box)
            shift = 0.06 * rank * (x1 - x0)  # IoU falls from 1 across the 0.5..0.95 thresholds
            bbox = [x0 + shift, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)]
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": category_ids[label], "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})  # fmt: skip
    data["annotations"] = annotations
    json_file.write_text(json.dumps(data))
    return json_file


def eval_only(config: Path, output: Path, *args: str) -> dict[str, float]:
    """tools/train_net.py --eval-only; the bbox metrics of its `copypaste:` lines."""
    result = run_python(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(config),
         "--eval-only", *args, f"train.output_dir={output}", "train.device=cpu"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, env=ENV,
    )  # fmt: skip
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    lines = re.findall(r"copypaste: (.*)", text)
    names_at = lines.index("Task: bbox") + 1
    return dict(zip(lines[names_at].split(","), map(float, lines[names_at + 1].split(","))))


def test_eval_only_onnx_gives_the_pytorch_ap(exported, predictors, tmp_path):
    onnx_path, pth_path = exported
    json_file = pseudo_labelled_dataset(tmp_path / "data", predictors[0])
    config = tmp_path / "pseudo.py"
    config.write_text(
        EVAL_CONFIG.format(
            json=str(json_file), images=str(json_file.parent / "images"), demo=str(DEMO)
        )
    )
    pytorch = eval_only(config, tmp_path / "pt", f"train.init_checkpoint={pth_path}")
    onnx = eval_only(config, tmp_path / "onnx", "--onnx", str(onnx_path))
    print(f"AP PyTorch {pytorch['AP']:.3f}, ONNX Runtime {onnx['AP']:.3f}")
    assert 5 < pytorch["AP"] < 95, pytorch  # the check can see an error
    assert abs(onnx["AP"] - pytorch["AP"]) <= 0.1, (pytorch, onnx)
    assert abs(onnx["AP50"] - pytorch["AP50"]) <= 0.1, (pytorch, onnx)


def test_onnx_flag_needs_eval_only(exported):
    result = run_python(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(DEMO),
         "--onnx", str(exported[0])],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, env=ENV,
    )  # fmt: skip
    assert result.returncode != 0 and "--eval-only" in result.stderr
