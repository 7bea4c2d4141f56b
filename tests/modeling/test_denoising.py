"""DINO's contrastive denoising against a brute-force reading of the DINO paper (Sec. 3.3).

Each check recomputes what the paper describes element by element in float64 (loops over
targets, groups and query pairs), independently of the vectorised builder.
"""

import math

import pytest
import torch
from torch import nn

from rankdetr.modeling.criterion import SetCriterion
from rankdetr.modeling.denoising import ContrastiveDenoising, denoising_attention_mask
from rankdetr.modeling.matcher import HungarianMatcher

NUM_CLASSES, CHANNELS = 80, 8


def targets_of(*counts, dtype=torch.float64, seed=0):
    """Targets with boxes well inside the image (no clamping of noised corners)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in counts:
        centres = 0.3 + 0.4 * torch.rand(count, 2, generator=generator, dtype=dtype)
        sizes = 0.05 + 0.1 * torch.rand(count, 2, generator=generator, dtype=dtype)
        labels = torch.randint(NUM_CLASSES, (count,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return targets


def builder(dn_number=6, label_noise=0.5, box_noise=1.0, seed=1):
    return ContrastiveDenoising(
        num_classes=NUM_CLASSES,
        dn_number=dn_number,
        label_noise_ratio=label_noise,
        box_noise_scale=box_noise,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture
def embedding():
    torch.manual_seed(0)
    return nn.Embedding(NUM_CLASSES, CHANNELS).double()


def logit(p):
    return math.log(p / (1 - p))


def test_group_layout_without_noise(embedding):
    """Noise off: slot g * 2M + j holds target j (positive), slot g * 2M + M + j the same target
    (negative); slots of images with fewer than M targets are zero."""
    targets = targets_of(3, 1)
    queries = builder(dn_number=7, label_noise=0, box_noise=0)(targets, embedding, 5)
    most, groups = 3, 7 // 3
    assert (queries.num_groups, queries.group_size, queries.num_queries) == (2, 6, 12)
    for b, target in enumerate(targets):
        for g in range(groups):
            for j in range(most):
                for slot in (g * 2 * most + j, g * 2 * most + most + j):
                    label_query = queries.label_queries[b, slot]
                    box_logits = queries.box_logits[b, slot]
                    if j < len(target["labels"]):
                        expected = embedding.weight[target["labels"][j]]
                        assert torch.equal(label_query, expected)
                        for c in range(4):
                            assert box_logits[c].item() == pytest.approx(
                                logit(target["boxes"][j, c].item()), rel=1e-12
                            )
                    else:
                        assert label_query.abs().sum() == 0 and box_logits.abs().sum() == 0


def test_positive_and_negative_box_noise_ranges():
    """Corner displacements, in half box sizes: positives in [0, 1), negatives in [1, 2) (box
    noise 1); both signs occur; the magnitude is uniform (mean 0.5 within its unit interval).
    Read from the noised (cx, cy, w, h) before the inverse sigmoid: a negative's corners may
    cross (w < 0), which the logits cannot hold."""
    boxes = targets_of(400)[0]["boxes"]
    negative = torch.arange(400) >= 200
    noised = builder(label_noise=0).noised_boxes(boxes, negative)
    positive_r, negative_r, signs = [], [], []
    for j in range(400):
        cx, cy, w, h = noised[j].tolist()
        tcx, tcy, tw, th = boxes[j].tolist()
        corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        target_corners = (tcx - tw / 2, tcy - th / 2, tcx + tw / 2, tcy + th / 2)
        halves = (tw / 2, th / 2, tw / 2, th / 2)
        bucket = negative_r if negative[j] else positive_r
        for moved, original, half in zip(corners, target_corners, halves):
            bucket.append(abs(moved - original) / half)
            signs.append(moved > original)
    assert max(positive_r) < 1 and min(negative_r) >= 1 - 1e-12 and max(negative_r) < 2
    assert abs(sum(positive_r) / len(positive_r) - 0.5) < 0.03
    assert abs(sum(negative_r) / len(negative_r) - 1.5) < 0.03
    assert 0.45 < sum(signs) / len(signs) < 0.55


def test_the_builder_places_the_noised_boxes_positive_then_negative():
    """The box logits of group g are the inverse sigmoid of the noised boxes of blocks 2g
    (positive) and 2g + 1 (negative) of the targets, drawn in that order."""
    targets = targets_of(3, 2)
    embedding = nn.Embedding(NUM_CLASSES, CHANNELS).double()
    queries = builder(dn_number=6, label_noise=0, seed=9)(targets, embedding, 5)
    all_boxes = torch.cat([t["boxes"] for t in targets])
    copies = 2 * queries.num_groups
    negative = torch.tensor([(i // 5) % 2 == 1 for i in range(5 * copies)])
    expected = builder(label_noise=0, seed=9).noised_boxes(all_boxes.repeat(copies, 1), negative)
    row = 0
    for block in range(copies):
        for b, target in enumerate(targets):
            for j in range(len(target["labels"])):
                slot = block * 3 + j
                for c in range(4):
                    x = min(max(expected[row, c].item(), 0.0), 1.0)
                    clamped_logit = math.log(max(x, 1e-3) / max(1 - x, 1e-3))  # eps 1e-3
                    assert queries.box_logits[b, slot, c].item() == pytest.approx(
                        clamped_logit, rel=1e-12, abs=1e-12
                    )
                row += 1


def test_box_noise_scale_scales_the_displacement():
    targets = targets_of(50)
    embedding = nn.Embedding(NUM_CLASSES, CHANNELS).double()
    full = builder(dn_number=50, label_noise=0, box_noise=1.0, seed=3)(targets, embedding, 5)
    half = builder(dn_number=50, label_noise=0, box_noise=0.5, seed=3)(targets, embedding, 5)
    true_corners = targets[0]["boxes"]

    def shifts(queries):
        b = queries.box_logits[0, :50].sigmoid()
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1) - torch.cat(
            [
                true_corners[:, :2] - true_corners[:, 2:] / 2,
                true_corners[:, :2] + true_corners[:, 2:] / 2,
            ],
            1,
        )

    torch.testing.assert_close(shifts(half), shifts(full) / 2, rtol=1e-9, atol=1e-12)


def test_noised_corners_are_clamped_to_the_image():
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.02, 0.98, 0.04, 0.04]])}]
    embedding = nn.Embedding(NUM_CLASSES, CHANNELS)
    queries = builder(dn_number=100, label_noise=0)(targets, embedding, 5)
    boxes = queries.box_logits[0].double().sigmoid()
    corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    assert corners.min() > -1e-3 and corners.max() < 1 + 1e-3  # inverse-sigmoid eps 1e-3


def test_label_noise_replaces_about_half_the_ratio():
    """Each copy's label is replaced with probability ratio / 2 by a uniform class (which equals
    the old one with probability 1 / K)."""
    targets = targets_of(100)
    embedding = nn.Embedding(NUM_CLASSES, CHANNELS).double()
    queries = builder(dn_number=2000, label_noise=0.5, box_noise=0)(targets, embedding, 5)
    table = embedding.weight
    changed = total = 0
    for slot in range(queries.num_queries):
        j = slot % 100
        row = queries.label_queries[0, slot]
        drawn = int((row[None] == table).all(1).nonzero()[0])
        changed += drawn != int(targets[0]["labels"][j])
        total += 1
    expected = 0.25 * (NUM_CLASSES - 1) / NUM_CLASSES
    assert abs(changed / total - expected) < 0.02, (changed / total, expected)


def test_attention_mask_brute_force():
    """Matching queries never see denoising queries; a denoising group sees itself and the
    matching queries, never another group."""
    groups, size, matching = 3, 4, 5
    mask = denoising_attention_mask(groups, size, matching)
    p = groups * size
    for i in range(p + matching):
        for j in range(p + matching):
            i_group = i // size if i < p else None
            j_group = j // size if j < p else None
            if i_group is None:
                blocked = j_group is not None
            else:
                blocked = j_group is not None and j_group != i_group
            assert mask[i, j].item() == blocked, (i, j)


def test_the_positive_matches_of_every_group():
    targets = targets_of(3, 1)
    queries = builder(dn_number=6)(targets, nn.Embedding(NUM_CLASSES, CHANNELS).double(), 5)
    matches = queries.matches(targets)
    assert [q.tolist() for q, _ in matches] == [[0, 1, 2, 6, 7, 8], [0, 6]]
    assert [t.tolist() for _, t in matches] == [[0, 1, 2, 0, 1, 2], [0, 0]]


def test_the_generator_decides_every_draw(embedding):
    targets = targets_of(4, 2)
    first = builder(seed=5)(targets, embedding, 5)
    again = builder(seed=5)(targets, embedding, 5)
    other = builder(seed=6)(targets, embedding, 5)
    assert torch.equal(first.box_logits, again.box_logits)
    assert torch.equal(first.label_queries, again.label_queries)
    assert not torch.equal(first.box_logits, other.box_logits)


def test_no_denoising_without_targets_or_when_off(embedding):
    assert builder()(targets_of(0, 0), embedding, 5) is None
    assert builder(dn_number=0)(targets_of(2), embedding, 5) is None
    with pytest.raises(ValueError, match="dn_number"):
        builder(dn_number=-1)


def brute_force_denoising_class_loss(logits, boxes, targets, groups, group_size, gcl):
    """Focal (t = 1) or GCL (t = (GIoU + 1) / 2) over every (image, slot, class), float64 loops,
    normalised by G times the target count."""
    alpha, gamma = 0.25, 2.0
    total = 0.0
    for b, target in enumerate(targets):
        positives = {}
        for g in range(groups):
            for j in range(len(target["labels"])):
                positives[g * group_size + j] = j
        for q in range(logits.shape[1]):
            for k in range(logits.shape[2]):
                p = 1 / (1 + math.exp(-logits[b, q, k].item()))
                j = positives.get(q)
                if j is not None and k == int(target["labels"][j]):
                    t = 1.0
                    if gcl:
                        t = (giou_of(boxes[b, q].tolist(), target["boxes"][j].tolist()) + 1) / 2
                    bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                    total += alpha * abs(t - p) ** gamma * bce
                else:
                    total += (1 - alpha) * p**gamma * -math.log(1 - p)
    count = sum(len(t["labels"]) for t in targets)
    return total / (groups * count)


def giou_of(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    # + 1e-6 on union and hull areas, as the losses compute it (box_ops.LOSS_IOU_EPS)
    union = a[2] * a[3] + b[2] * b[3] - inter + 1e-6
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0)) + 1e-6
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("loss", ["focal", "gcl"])
def test_denoising_losses_brute_force(loss):
    """loss_class_dn: the positives of every group against their own targets, negatives and
    padding as background (GCL: the positives' target is their (GIoU + 1) / 2); loss_bbox_dn:
    L1 over the positives; both normalised by G times the box count; weights applied."""
    torch.manual_seed(0)
    targets = targets_of(3, 1)
    queries = builder(dn_number=6)(targets, nn.Embedding(NUM_CLASSES, CHANNELS).double(), 4)
    logits = torch.randn(2, queries.num_queries, NUM_CLASSES, dtype=torch.float64)
    boxes = torch.cat(
        [0.4 + 0.2 * torch.rand(2, queries.num_queries, 2), 0.1 + 0.1 * torch.rand(2, 12, 2)], -1
    ).double()
    criterion = SetCriterion(
        num_classes=NUM_CLASSES,
        matcher=HungarianMatcher(),
        weight_class=1.0,
        weight_bbox=5.0,
        weight_giou=2.0,
        classification_loss=loss,
    )
    outputs = {"logits": [logits * 0.5, logits], "boxes": [boxes, boxes]}
    losses = criterion.denoising_losses(
        outputs, targets, queries.matches(targets), queries.num_groups, 2
    )
    assert sorted(losses) == sorted(
        f"loss_{n}_dn{s}" for n in ("class", "bbox", "giou") for s in ("", "_0")
    )
    expected = brute_force_denoising_class_loss(
        logits, boxes, targets, queries.num_groups, queries.group_size, loss == "gcl"
    )
    assert losses["loss_class_dn"].item() == pytest.approx(expected, rel=1e-10)
    l1 = sum(
        (boxes[b, g * 6 + j] - t["boxes"][j]).abs().sum().item()
        for b, t in enumerate(targets)
        for g in range(2)
        for j in range(len(t["labels"]))
    )
    assert losses["loss_bbox_dn"].item() == pytest.approx(5.0 * l1 / (2 * 4), rel=1e-10)


def test_denoising_losses_are_zero_terms_without_queries():
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = criterion.denoising_losses(None, targets_of(1), [], 0, 3)
    assert len(losses) == 9 and all(v.item() == 0 for v in losses.values())
    assert "loss_giou_dn_1" in losses and "loss_giou_dn_2" not in losses
