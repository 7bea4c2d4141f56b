"""RankDETR.forward_layers and rankdetr.analysis.collect on a tiny random model."""

import itertools

import pytest
import torch

from rankdetr.analysis.collect import (
    collect_layer_outputs,
    matched_and_unmatched_scores,
    unmatched_max_ious,
)
from rankdetr.modeling.rank_options import RankOptions
from tests.analysis.test_stats import _iou_float64
from tests.modeling.test_rank_detr import batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(RankOptions()).eval()


@pytest.fixture(scope="module")
def records(model):
    torch.manual_seed(1)
    return collect_layer_outputs(model, batch(), keep_logits=True, total=2)


def test_forward_layers_last_layer_gives_the_inference_detections(model):
    torch.manual_seed(0)
    inputs = batch()
    with torch.no_grad():
        layers = model.forward_layers(inputs)
        results = model(inputs)
    assert len(layers["logits"]) == len(layers["boxes"]) == 2  # decoder layers
    assert layers["logits"][0].shape == (2, 6, 3) and layers["boxes"][1].shape == (2, 6, 4)
    assert layers["image_sizes"] == [(64, 96), (80, 64)]
    for image, result in enumerate(results):
        instances = result["instances"]
        logits, boxes = layers["logits"][-1][image], layers["boxes"][-1][image]
        # The best (query, class) pair by sigmoid score, found by a plain loop.
        pairs = [(float(torch.sigmoid(logits[q, k])), q, k) for q in range(6) for k in range(3)]
        score, query, label = max(pairs)
        assert instances.scores[0].item() == pytest.approx(score, abs=1e-6)
        assert instances.pred_classes[0].item() == label
        cx, cy, w, h = boxes[query].tolist()
        out_h, out_w = instances.image_size
        expected = [
            min(max(v, 0.0), limit)
            for v, limit in zip(
                [(cx - w / 2) * out_w, (cy - h / 2) * out_h, (cx + w / 2) * out_w,
                 (cy + h / 2) * out_h],
                [out_w, out_h, out_w, out_h],
            )
        ]  # fmt: skip
        assert instances.pred_boxes.tensor[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_records_hold_every_layer_and_the_ground_truth_in_original_pixels(records):
    assert len(records) == 2 and all(r.num_layers == 2 for r in records)
    # batch(): the inputs are half the original size ("height"/"width" = 2x), so ground-truth
    # boxes in original pixels are twice those of the inputs.
    expected = [
        [[8.0, 12.0, 80.0, 100.0], [100.0, 20.0, 180.0, 120.0]],
        [[20.0, 20.0, 60.0, 140.0]],
    ]
    for record, gt in zip(records, expected):
        assert torch.allclose(record.gt_xyxy(), torch.tensor(gt), atol=1e-4)
    assert records[0].gt_classes.tolist() == [0, 2] and records[1].gt_classes.tolist() == [1]
    assert (records[0].height, records[0].width) == (128, 192)
    assert records[0].scores.shape == (2, 6) and records[0].boxes.shape == (2, 6, 4)
    assert records[0].logits.shape == (2, 6, 3)
    best = records[0].logits.double().sigmoid().max(dim=-1)
    assert torch.allclose(records[0].scores.double(), best.values, atol=1e-6)
    assert torch.equal(records[0].labels, best.indices)


def test_each_layer_matching_is_a_minimum_cost_assignment(model, records):
    """The matcher's pairs per layer: every ground-truth box once, distinct queries, and a total
    cost no brute-force assignment beats."""
    matcher = model.criterion.matcher
    for record, layer in itertools.product(records, range(2)):
        queries, gts = record.matches[layer]
        num_gt = len(record.gt_classes)
        assert sorted(gts.tolist()) == list(range(num_gt)) and len(set(queries.tolist())) == num_gt
        cost = matcher.cost_matrix(
            record.logits[layer], record.boxes[layer], record.gt_classes, record.gt_boxes
        ).double()
        chosen = sum(cost[q, t] for q, t in zip(queries.tolist(), gts.tolist()))
        best = min(
            sum(cost[q, t] for t, q in enumerate(assignment))
            for assignment in itertools.permutations(range(cost.shape[0]), num_gt)
        )
        assert chosen == pytest.approx(float(best), abs=1e-5)


def test_scores_and_ious_split_like_python_loops(records):
    positives, negatives = matched_and_unmatched_scores(records, layer=-1)
    expected_pos, expected_neg = [], []
    for record in records:
        matched = set(record.matches[-1][0].tolist())
        for q, score in enumerate(record.scores[-1].tolist()):
            (expected_pos if q in matched else expected_neg).append(score)
    assert positives.tolist() == pytest.approx(expected_pos)
    assert negatives.tolist() == pytest.approx(expected_neg)
    assert positives.size == 3 and negatives.size == 2 * 6 - 3

    for layer in range(2):
        expected = []
        for record in records:
            matched = set(record.matches[layer][0].tolist())
            boxes, gt = record.boxes_xyxy(layer).double(), record.gt_xyxy().double()
            expected += [max(_iou_float64(boxes[q].tolist(), g.tolist()) for g in gt)
                         for q in range(6) if q not in matched]  # fmt: skip
        assert unmatched_max_ious(records, layer).tolist() == pytest.approx(expected, abs=1e-5)
