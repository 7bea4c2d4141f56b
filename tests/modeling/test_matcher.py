"""HungarianMatcher: optimal assignments (brute force over permutations) for both costs."""

import itertools
import math

import pytest
import torch

from rankdetr.modeling.matcher import HungarianMatcher
from tests import reference_math as ref


def standard_cost(logit, box, label, gt_box, alpha=0.25, gamma=2.0):
    p = ref.sigmoid(logit[label])
    focal = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(
        1 - p + 1e-8
    )
    l1 = sum(abs(a - b) for a, b in zip(box, gt_box))
    return 2 * focal + 5 * l1 - 2 * ref.giou(ref.xyxy(box), ref.xyxy(gt_box), ref.RELEASE_IOU_EPS)


def high_order_cost(logit, box, label, gt_box, power=4.0, quality="iou"):
    p = ref.sigmoid(logit[label])
    a, b = ref.xyxy(box), ref.xyxy(gt_box)
    eps = ref.RELEASE_IOU_EPS
    q = ref.iou(a, b, eps) if quality == "iou" else (ref.giou(a, b, eps) + 1) / 2
    return -(p * q**power)


def brute_force_min_cost(cost, num_queries, num_targets):
    """Smallest total cost over all injective maps between the smaller and the larger side."""
    best = math.inf
    if num_targets <= num_queries:
        for queries in itertools.permutations(range(num_queries), num_targets):
            best = min(best, sum(cost(q, t) for t, q in enumerate(queries)))
    else:
        for targets in itertools.permutations(range(num_targets), num_queries):
            best = min(best, sum(cost(q, t) for q, t in enumerate(targets)))
    return best


def random_case(seed, queries, targets, classes=3, duplicate=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, queries, classes, generator=g, dtype=torch.float64) * 2
    centres = torch.rand(1, queries, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    sizes = torch.rand(1, queries, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], -1)
    gt = torch.cat(
        [
            torch.rand(targets, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2,
            torch.rand(targets, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05,
        ],
        -1,
    )
    labels = torch.randint(classes, (targets,), generator=g)
    if duplicate and targets >= 2:
        gt[1], labels[1] = gt[0], labels[0]
    return logits, boxes, {"labels": labels, "boxes": gt}


CASES = [(5, 3, False), (4, 4, False), (3, 5, False), (5, 3, True), (4, 1, False)]


@pytest.mark.parametrize("high_order", [False, True], ids=["standard", "high_order"])
@pytest.mark.parametrize("queries,targets,duplicate", CASES)
def test_assignment_is_optimal(queries, targets, duplicate, high_order):
    for seed in range(3):
        logits, boxes, target = random_case(seed, queries, targets, duplicate=duplicate)
        matcher = HungarianMatcher(high_order_start=0.5)
        matcher.set_training_progress(0.75 if high_order else 0.25)
        assert matcher.use_high_order == high_order
        rows, cols = matcher(logits, boxes, [target])[0]
        assert len(rows) == min(queries, targets)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)

        def cost(q, t, logits=logits, boxes=boxes, target=target):
            args = (logits[0, q].tolist(), boxes[0, q].tolist())
            gt = (int(target["labels"][t]), target["boxes"][t].tolist())
            return high_order_cost(*args, *gt) if high_order else standard_cost(*args, *gt)

        found = sum(cost(q, t) for q, t in zip(rows.tolist(), cols.tolist()))
        assert found == pytest.approx(brute_force_min_cost(cost, queries, targets), abs=1e-6)


def test_high_order_cost_matches_eq8_for_both_qualities():
    logits, boxes, target = random_case(0, 4, 3)
    for quality in ("iou", "giou"):
        matcher = HungarianMatcher(
            high_order_start=0.0, high_order_quality=quality, high_order_power=3
        )
        cost = matcher.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
        for q in range(4):
            for t in range(3):
                expected = high_order_cost(
                    logits[0, q].tolist(),
                    boxes[0, q].tolist(),
                    int(target["labels"][t]),
                    target["boxes"][t].tolist(),
                    power=3,
                    quality=quality,
                )
                assert cost[q, t].item() == pytest.approx(expected, abs=1e-6)


def test_switch_follows_training_progress_only():
    matcher = HungarianMatcher(high_order_start=0.75)
    assert not matcher.use_high_order
    matcher.set_training_progress(0.7499)
    assert not matcher.use_high_order
    matcher.set_training_progress(0.75)
    assert matcher.use_high_order
    matcher.set_training_progress(0.1)  # e.g. a resumed run restarting from an earlier point
    assert not matcher.use_high_order
    never = HungarianMatcher(high_order_start=None)
    never.set_training_progress(1.0)
    assert not never.use_high_order


def test_zero_targets_give_no_match():
    logits, boxes, _ = random_case(0, 4, 1)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    rows, cols = HungarianMatcher()(logits, boxes, [empty])[0]
    assert rows.numel() == 0 and cols.numel() == 0


@pytest.mark.parametrize("high_order", [False, True])
@pytest.mark.parametrize("broken", ["nan_logit", "inf_box", "nan_box"])
def test_broken_queries_are_avoided(high_order, broken):
    """Query 0 would be the best match for the target, but its prediction is broken on the
    target's own class or box: the matcher must take query 1 (a NaN cost counts as worst)."""
    target = {
        "labels": torch.tensor([2]),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64),
    }
    logits = torch.full((1, 2, 3), -2.0, dtype=torch.float64)
    logits[0, 0, 2], logits[0, 1, 2] = 3.0, 0.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.3, 0.25]]], dtype=torch.float64)
    if broken == "nan_logit":
        logits[0, 0, 2] = float("nan")
    elif broken == "inf_box":
        boxes[0, 0, 2] = float("inf")
    else:
        boxes[0, 0] = float("nan")
    matcher = HungarianMatcher(high_order_start=0.0 if high_order else None)
    rows, cols = matcher(logits, boxes, [target])[0]
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="high_order_quality"):
        HungarianMatcher(high_order_quality="l1")
    with pytest.raises(ValueError, match="high_order_start"):
        HungarianMatcher(high_order_start=75000)


def test_standard_cost_matches_eq5():
    logits, boxes, target = random_case(2, 4, 3)
    cost = HungarianMatcher().cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
    for q in range(4):
        for t in range(3):
            expected = standard_cost(
                logits[0, q].tolist(),
                boxes[0, q].tolist(),
                int(target["labels"][t]),
                target["boxes"][t].tolist(),
            )
            assert cost[q, t].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("high_order", [False, True], ids=["standard", "high_order"])
def test_a_batch_is_matched_image_by_image(high_order, dtype):
    """Three images in one call (one without targets): each gets the optimal assignment of its
    own queries and targets (brute force), the very indices a call with that image alone gives,
    and its costs equal that image's own cost matrix bit for bit."""
    cases = [random_case(10 + image, 7, targets) for image, targets in enumerate([3, 0, 4])]
    logits = torch.cat([case[0] for case in cases]).to(dtype)
    boxes = torch.cat([case[1] for case in cases]).to(dtype)
    targets = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for _, _, t in cases]
    matcher = HungarianMatcher(high_order_start=0.5)
    matcher.set_training_progress(0.75 if high_order else 0.25)
    matches = matcher(logits, boxes, targets)
    assert len(matches) == 3 and all(len(indices) == 0 for indices in matches[1])
    labels, gt_boxes = torch.cat([t["labels"] for t in targets]), torch.cat(
        [t["boxes"] for t in targets]
    )
    together = matcher.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, gt_boxes)
    blocks = together.view(3, 7, -1).split([3, 0, 4], dim=-1)
    for image in (0, 2):
        alone = matcher.cost_matrix(logits[image], boxes[image], *targets[image].values())
        assert torch.equal(blocks[image][image], alone)
        rows, cols = matches[image]
        expected_rows, expected_cols = matcher(logits[image : image + 1], boxes[image : image + 1],
                                               [targets[image]])[0]  # fmt: skip
        assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)
        total = sum(float(alone[q, t]) for q, t in zip(rows.tolist(), cols.tolist()))
        best = brute_force_min_cost(
            lambda q, t, alone=alone: float(alone[q, t]), 7, len(targets[image]["labels"])
        )
        assert total == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("high_order", [False, True], ids=["standard", "high_order"])
def test_decoder_layers_are_matched_each_on_its_own(high_order, dtype):
    """match_layers: three layers' predictions of the same two images (one without targets) in
    one call. Each layer's costs equal that layer's own cost matrix bit for bit, and each
    (layer, image) gets the optimal assignment of its own costs (brute force): the layers'
    costs never mix, as they would if the layers were taken as more images of one batch."""
    layers = [[random_case(20 + 3 * layer + image, 6, 3)[:2] for image in range(2)]
              for layer in range(3)]  # fmt: skip
    logits = torch.stack([torch.cat([c[0] for c in layer]) for layer in layers]).to(dtype)
    boxes = torch.stack([torch.cat([c[1] for c in layer]) for layer in layers]).to(dtype)
    _, _, target = random_case(40, 6, 3)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4, dtype=dtype)}
    targets = [{"labels": target["labels"], "boxes": target["boxes"].to(dtype)}, empty]
    matcher = HungarianMatcher(high_order_start=0.5)
    matcher.set_training_progress(0.75 if high_order else 0.25)
    matches = matcher.match_layers(logits, boxes, targets)
    assert len(matches) == 3 and all(len(per_layer) == 2 for per_layer in matches)
    together = matcher.cost_matrix(logits.flatten(1, 2), boxes.flatten(1, 2), *target.values())
    for layer in range(3):
        assert all(len(indices) == 0 for indices in matches[layer][1])
        alone = matcher.cost_matrix(logits[layer, 0], boxes[layer, 0], *targets[0].values())
        assert torch.equal(together[layer, :6], alone)
        rows, cols = matches[layer][0]
        total = sum(float(alone[q, t]) for q, t in zip(rows.tolist(), cols.tolist()))
        best = brute_force_min_cost(lambda q, t, alone=alone: float(alone[q, t]), 6, 3)
        assert total == pytest.approx(best, rel=1e-12, abs=1e-12)
        single = matcher(logits[layer], boxes[layer], targets)[0]
        assert all(torch.equal(a, b) for a, b in zip(single, matches[layer][0]))
