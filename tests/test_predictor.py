"""rankdetr.Predictor: images in (arrays, files; RGB, grayscale, RGBA), detections out in the
image's own pixels; clear errors for bad checkpoints, images and configs."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from PIL import Image

from rankdetr.data.mapper import DetrDatasetMapper
from rankdetr.data.synthetic import SHAPES_CATEGORIES
from rankdetr.engine.runner import build_model, load_config
from rankdetr.predictor import (
    CheckpointError,
    ConfigError,
    ImageReadError,
    Predictor,
    as_rgb_image,
)
from tests.conftest import REPO_ROOT

DEMO_CONFIG = str(REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")
# The demo config shrunk to a model that builds and infers in well under a second.
TINY_OVERRIDES = [
    "model.embed_dim=32",
    "model.neck.out_channels=32",
    "model.neck.norm_groups=8",  # 32 groups of one channel cannot normalise a 1x1 level
    "model.ffn_dim=64",
    "model.num_points=2",
    "model.encoder_layers=1",
    "model.decoder_layers=2",
    "model.num_queries=8",
    "model.num_queries_one2many=8",
    "model.num_detections=10",
    "dataloader.test.mapper.augmentation.0.short_edge_length=64",
    "dataloader.test.mapper.augmentation.0.max_size=96",
]
NAMES = [category["name"] for category in SHAPES_CATEGORIES]


def save_tiny_checkpoint(path, overrides=TINY_OVERRIDES, seed=0):
    """Build the tiny demo model with random weights and save it as {"model": state_dict}."""
    torch.manual_seed(seed)
    model = build_model(load_config(DEMO_CONFIG, list(overrides)))
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("predictor") / "tiny.pth"
    save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(DEMO_CONFIG, checkpoint, overrides=TINY_OVERRIDES)


def random_image(height, width, channels=3, seed=0):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_same_prediction(a, b):
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.classes, b.classes)


def test_matches_the_evaluation_pipeline_on_a_file(predictor, checkpoint, tmp_path):
    """Same detections as the model gets from the test mapper (detectron2's evaluation input)."""
    image = random_image(70, 110)
    Image.fromarray(image).save(tmp_path / "image.png")
    model = build_model(load_config(DEMO_CONFIG, TINY_OVERRIDES))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(64, max_size=96)], is_train=False)
    record = {"file_name": str(tmp_path / "image.png"), "height": 70, "width": 110, "image_id": 1}
    with torch.no_grad():
        expected = model.eval()([mapper(record)])[0]["instances"]

    result = predictor(tmp_path / "image.png")
    assert result.image_size == (70, 110) and len(result) == 10
    np.testing.assert_allclose(result.boxes, expected.pred_boxes.tensor.numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.scores, expected.scores.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(result.classes, expected.pred_classes.numpy())
    assert result.class_names == [NAMES[c] for c in result.classes]
    assert_same_prediction(predictor(image), result)  # the array gives the same as its PNG
    assert_same_prediction(predictor(str(tmp_path / "image.png")), result)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_arrays_and_files_are_converted(predictor, tmp_path, mode):
    rgb = random_image(60, 80)
    if mode == "L":
        array = rgb[:, :, 0]
        as_rgb = np.repeat(array[:, :, None], 3, axis=2)
    else:
        array = np.concatenate([rgb, random_image(60, 80, 1, seed=1)], axis=2)  # random alpha
        as_rgb = rgb
    Image.fromarray(array, mode=mode).save(tmp_path / "image.png")
    expected = predictor(as_rgb)
    assert_same_prediction(predictor(array), expected)
    assert_same_prediction(predictor(tmp_path / "image.png"), expected)
    if mode == "L":
        assert_same_prediction(predictor(array[:, :, None]), expected)


def test_boxes_are_rescaled_to_each_images_own_size(predictor, monkeypatch):
    """A network returning fixed normalised boxes: an image and its 2x copy get boxes in their
    own pixels, although both reach the network at the same resized size."""
    # (cx, cy, w, h) of query 0 and 1; query 0 scores class 1, query 1 class 3, others nothing.
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 0.2]])
    logits = torch.full((2, len(NAMES)), -10.0)
    logits[0, 1], logits[1, 3] = 3.0, 2.0
    seen_sizes = []

    def fixed_predict(images, padding_mask, num_one2many):
        seen_sizes.append(tuple(images.shape[-2:]))
        n = images.shape[0]
        return {"logits": [logits.expand(n, -1, -1)], "boxes": [boxes.expand(n, -1, -1)]}

    monkeypatch.setattr(predictor.model, "predict", fixed_predict)
    monkeypatch.setattr(predictor, "score_threshold", 0.5)
    small, large = random_image(50, 70), random_image(100, 140)
    results = predictor.predict_batch([small, large])
    # Shorter side 50 -> 64: 70 * 64 / 50 = 89.6 -> 90 (under max_size 96); the same for 100x140.
    assert seen_sizes == [(64, 90)]
    for result, (h, w) in zip(results + [predictor(large)], [(50, 70), (100, 140), (100, 140)]):
        expected = [[0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h], [0.0, 0.4 * h, 0.5 * w, 0.6 * h]]
        np.testing.assert_allclose(result.boxes, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(result.scores, torch.sigmoid(torch.tensor([3.0, 2.0])))
        assert result.classes.tolist() == [1, 3] and result.class_names == [NAMES[1], NAMES[3]]
        assert result.image_size == (h, w)


def test_batch_equals_single_images(predictor):
    images = [random_image(64, 90, seed=seed) for seed in (3, 4)]
    batch = predictor.predict_batch(images, batch_size=2)
    for image, result in zip(images, batch):
        single = predictor(image)
        np.testing.assert_allclose(result.boxes, single.boxes, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(result.scores, single.scores, rtol=1e-4, atol=1e-5)


def test_the_model_gets_the_channel_order_it_was_trained_with(predictor, checkpoint):
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[:, :, 0] = 255
    assert predictor.model_input(red)["image"][:, 0, 0].tolist() == [255, 0, 0]
    overrides = [*TINY_OVERRIDES, "dataloader.test.mapper.img_format=BGR"]
    bgr = Predictor(DEMO_CONFIG, checkpoint, overrides=overrides)
    assert bgr.model_input(red)["image"][:, 0, 0].tolist() == [0, 0, 255]


def test_score_threshold_drops_low_scores(checkpoint, predictor):
    image = random_image(50, 70)
    scores = predictor(image).scores
    threshold = float(np.median(scores))
    strict = Predictor(DEMO_CONFIG, checkpoint, score_threshold=threshold, overrides=TINY_OVERRIDES)
    assert strict(image).scores.tolist() == [s for s in scores.tolist() if s >= threshold]


def test_missing_unreadable_and_mismatched_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        Predictor(DEMO_CONFIG, tmp_path / "nowhere.pth", overrides=TINY_OVERRIDES)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        Predictor(DEMO_CONFIG, tmp_path / "junk.pth", overrides=TINY_OVERRIDES)
    save_tiny_checkpoint(tmp_path / "other.pth", [*TINY_OVERRIDES, "model.decoder_layers=3"])
    with pytest.raises(CheckpointError, match="other.pth.*does not fit"):
        Predictor(DEMO_CONFIG, tmp_path / "other.pth", overrides=TINY_OVERRIDES)


def test_missing_and_unreadable_images_are_named(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        predictor(tmp_path / "absent.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        predictor(str(tmp_path / "broken.png"))
    with pytest.raises(TypeError, match="uint8"):
        predictor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(8, 8, 2\)"):
        as_rgb_image(np.zeros((8, 8, 2), dtype=np.uint8))


def test_configs_without_model_or_test_mapper_are_refused(checkpoint):
    cfg = load_config(DEMO_CONFIG, TINY_OVERRIDES)
    without_model = copy.deepcopy(cfg)
    del without_model.model
    with pytest.raises(ConfigError, match="'model'"):
        Predictor(without_model, checkpoint)
    del cfg.dataloader.test
    with pytest.raises(ConfigError, match="dataloader.test.mapper"):
        Predictor(cfg, checkpoint)
    with pytest.raises(ConfigError, match="model.embed_dimm"):
        Predictor(DEMO_CONFIG, checkpoint, overrides=["model.embed_dimm=32"])


def test_import_rankdetr_stays_light_and_exports_the_predictor():
    import rankdetr
    import rankdetr.predictor

    assert rankdetr.Predictor is rankdetr.predictor.Predictor
    code = "import sys, rankdetr; assert 'detectron2' not in sys.modules, 'detectron2 imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
