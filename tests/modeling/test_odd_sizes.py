"""The demo model (random weights, eval mode) on tiny images, extreme aspect ratios and batches
that mix sizes: no crash, 50 finite detections inside each image, scores in [0, 1]."""

from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate

from rankdetr.engine.runner import load_config

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py")


@pytest.fixture(scope="module")
def demo_model():
    cfg = load_config(DEMO, [])
    cfg.model.num_classes = 5
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def _inputs(sizes, original_sizes=None):
    generator = torch.Generator().manual_seed(1)
    inputs = []
    for index, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        item = {"image": image}
        if original_sizes:
            item["height"], item["width"] = original_sizes[index]
        inputs.append(item)
    return inputs


def _check_detections(results, sizes, num_detections):
    assert len(results) == len(sizes)
    for result, (h, w) in zip(results, sizes):
        instances = result["instances"]
        assert instances.image_size == (h, w) and len(instances) == num_detections
        boxes, scores = instances.pred_boxes.tensor, instances.scores
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert ((scores >= 0) & (scores <= 1)).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < 5)).all()


@pytest.mark.parametrize(
    "size",
    [(32, 32), (8, 8), (1, 1), (32, 1024), (1024, 24), (3, 500)],
    ids=lambda size: f"{size[0]}x{size[1]}",
)
def test_single_odd_image(demo_model, size):
    with torch.no_grad():
        results = demo_model(_inputs([size]))
    _check_detections(results, [size], demo_model.num_detections)


def test_batch_mixing_tiny_wide_tall_and_normal_images(demo_model):
    sizes = [(8, 8), (32, 320), (320, 24), (160, 128), (1, 7)]
    with torch.no_grad():
        results = demo_model(_inputs(sizes))
    _check_detections(results, sizes, demo_model.num_detections)


def test_detections_are_rescaled_to_the_original_size(demo_model):
    # A 16x512 network input of a 64x2048 original: boxes come back in original pixels.
    with torch.no_grad():
        (small,) = demo_model(_inputs([(16, 512)]))
        (large,) = demo_model(_inputs([(16, 512)], original_sizes=[(64, 2048)]))
    _check_detections([large], [(64, 2048)], demo_model.num_detections)
    torch.testing.assert_close(
        large["instances"].pred_boxes.tensor, small["instances"].pred_boxes.tensor * 4
    )
