"""SetCriterion: loss values against a plain-Python computation on the same assignment."""

import pytest
import torch

from rankdetr.modeling.criterion import SetCriterion, repeat_targets
from rankdetr.modeling.matcher import HungarianMatcher
from tests import reference_math as ref


def problem(seed=0, batch=2, queries=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=g, dtype=torch.float64)
    boxes = torch.cat(
        [
            torch.rand(batch, queries, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25,
            torch.rand(batch, queries, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1,
        ],
        -1,
    )
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": boxes[0, :2].clone() + 0.02},
        {"labels": torch.tensor([1]), "boxes": boxes[1, 3:4].clone() - 0.01},
    ]
    return logits, boxes, targets


def brute_force_losses(logits, boxes, targets, matches, kind, alpha=0.25, gamma=2.0):
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    matched = {}
    for n, (rows, cols) in enumerate(matches):
        for q, t in zip(rows.tolist(), cols.tolist()):
            matched[(n, q)] = (int(targets[n]["labels"][t]), targets[n]["boxes"][t].tolist())
    cls = l1 = giou_loss = 0.0
    for n in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            box = boxes[n, q].tolist()
            for k in range(logits.shape[2]):
                p = ref.sigmoid(logits[n, q, k].item())
                if (n, q) in matched and matched[(n, q)][0] == k:
                    gt = matched[(n, q)][1]
                    t = (
                        1.0
                        if kind == "focal"
                        else (ref.giou(ref.xyxy(box), ref.xyxy(gt), ref.RELEASE_IOU_EPS) + 1) / 2
                    )
                    cls += alpha * abs(t - p) ** gamma * ref.bce(p, t)
                else:
                    cls += (1 - alpha) * p**gamma * ref.bce(p, 0.0)
            if (n, q) in matched:
                gt = matched[(n, q)][1]
                l1 += sum(abs(a - b) for a, b in zip(box, gt))
                giou_loss += 1 - ref.giou(ref.xyxy(box), ref.xyxy(gt), ref.RELEASE_IOU_EPS)
    return {
        "loss_class": 2 * cls / num_boxes,
        "loss_bbox": 5 * l1 / num_boxes,
        "loss_giou": 2 * giou_loss / num_boxes,
    }


@pytest.mark.parametrize("kind", ["focal", "gcl"])
def test_losses_match_a_brute_force_computation(kind):
    logits, boxes, targets = problem()
    matcher = HungarianMatcher()
    criterion = SetCriterion(num_classes=3, matcher=matcher, classification_loss=kind)
    losses = criterion({"logits": [logits], "boxes": [boxes]}, targets)
    expected = brute_force_losses(logits, boxes, targets, matcher(logits, boxes, targets), kind)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-9), name


@pytest.mark.parametrize("kind", ["focal", "gcl"])
def test_each_decoder_layer_gets_the_losses_of_its_own_matching(kind):
    """Three layers' outputs, one-to-one and one-to-many, go through the criterion in one pass
    per group: each layer's terms equal the brute-force losses of that layer alone, under the
    assignment the matcher gives that layer alone (so one layer's matches, boxes or sums never
    reach another's)."""
    layers = [problem(seed=seed) for seed in (3, 4, 5)]
    o2m_layers = [problem(seed=seed, queries=8) for seed in (6, 7, 8)]
    _, _, targets = problem()
    matcher = HungarianMatcher()
    criterion = SetCriterion(
        num_classes=3, matcher=matcher, classification_loss=kind, weight_one2many=0.5
    )
    losses = criterion(
        {"logits": [c[0] for c in layers], "boxes": [c[1] for c in layers]},
        targets,
        {"logits": [c[0] for c in o2m_layers], "boxes": [c[1] for c in o2m_layers]},
        one2many_repeats=2,
    )
    repeated = repeat_targets(targets, 2)
    for prefix, group, group_targets, scale in [
        ("", layers, targets, 1.0),
        # brute_force_losses normalises by the k-fold targets' boxes, as the criterion does.
        ("o2m_", o2m_layers, repeated, 0.5),  # lambda
    ]:
        for layer, (logits, boxes, _) in enumerate(group):
            suffix = "" if layer == 2 else f"_{layer}"
            matches = matcher(logits, boxes, group_targets)
            expected = brute_force_losses(logits, boxes, group_targets, matches, kind)
            for name, value in expected.items():
                got = losses[f"{prefix}{name}{suffix}"].item()
                assert got == pytest.approx(value * scale, rel=1e-9), (prefix, name, layer)


def test_all_outputs_get_their_losses_and_one2many_uses_repeated_targets():
    logits, boxes, targets = problem()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(), weight_one2many=0.5)
    o2m_logits, o2m_boxes, _ = problem(seed=1, queries=8)
    outputs = {
        "logits": [logits, logits * 0.5],
        "boxes": [boxes, boxes],
        "enc_logits": logits,
        "enc_boxes": boxes,
    }
    losses = criterion(outputs, targets, {"logits": [o2m_logits], "boxes": [o2m_boxes]}, 3)
    expected_keys = {
        f"{prefix}loss_{term}{suffix}"
        for term in ("class", "bbox", "giou")
        for prefix, suffix in [("", ""), ("", "_0"), ("", "_enc"), ("o2m_", "")]
    }
    assert set(losses) == expected_keys
    repeated = repeat_targets(targets, 3)
    assert [len(t["labels"]) for t in repeated] == [6, 3]
    single = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    plain = single({"logits": [o2m_logits], "boxes": [o2m_boxes]}, repeated)
    # Normalised by k * (number of boxes) and weighted by lambda = 0.5.
    assert losses["o2m_loss_bbox"].item() == pytest.approx(0.5 * plain["loss_bbox"].item())


def test_encoder_loss_is_class_agnostic_focal():
    logits, boxes, targets = problem()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(), classification_loss="gcl")
    losses = criterion(
        {"logits": [logits], "boxes": [boxes], "enc_logits": logits, "enc_boxes": boxes}, targets
    )
    agnostic = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    focal = SetCriterion(num_classes=3, matcher=HungarianMatcher(), classification_loss="focal")
    expected = focal({"logits": [logits], "boxes": [boxes]}, agnostic)
    for term in ("class", "bbox", "giou"):
        assert losses[f"loss_{term}_enc"].item() == pytest.approx(expected[f"loss_{term}"].item())


def test_images_without_targets_give_finite_losses_and_gradients():
    logits, boxes, _ = problem()
    logits.requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = SetCriterion(num_classes=3, matcher=HungarianMatcher())(
        {"logits": [logits], "boxes": [boxes]}, empty
    )
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_perfect_predictions_have_zero_box_losses():
    _, boxes, targets = problem()
    logits = torch.full((2, 5, 3), -20.0, dtype=torch.float64)
    targets = [{"labels": torch.tensor([1]), "boxes": boxes[0, 2:3]}, targets[1]]
    boxes = boxes.clone()
    boxes[1, 3] = targets[1]["boxes"][0]
    logits[0, 2, 1] = logits[1, 3, 1] = 20.0
    losses = SetCriterion(num_classes=3, matcher=HungarianMatcher(), classification_loss="focal")(
        {"logits": [logits], "boxes": [boxes]}, targets
    )
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-9)
    # GIoU of a box with itself is area / (area + eps) with the release's eps = 1e-6.
    expected_giou = sum(
        1 - ref.giou(ref.xyxy(b), ref.xyxy(b), ref.RELEASE_IOU_EPS)
        for b in (boxes[0, 2].tolist(), boxes[1, 3].tolist())
    )
    assert 0 < expected_giou < 1e-4
    assert losses["loss_giou"].item() == pytest.approx(2 * expected_giou / 2, rel=1e-9)
    assert losses["loss_class"].item() < 1e-6


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="classification_loss"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), classification_loss="bce")
    with pytest.raises(ValueError, match="quality_target"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), quality_target="l1")


@pytest.mark.parametrize("kind,target", [("gcl", "giou"), ("gcl", "iou"), ("varifocal", "iou")])
def test_quality_targets_are_detached(kind, target):
    """The GIoU-aware target t is a label (Eq. 6: detached): the classification loss sends no
    gradient into the predicted boxes, only into the logits."""
    logits, boxes, targets = problem()
    boxes = boxes.clone().requires_grad_()
    logits = logits.clone().requires_grad_()
    criterion = SetCriterion(
        num_classes=3, matcher=HungarianMatcher(), classification_loss=kind, quality_target=target
    )
    losses = criterion({"logits": [logits], "boxes": [boxes]}, targets)
    losses["loss_class"].backward()
    assert boxes.grad is None or torch.count_nonzero(boxes.grad) == 0
    assert torch.count_nonzero(logits.grad) > 0
