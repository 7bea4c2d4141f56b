"""Focal loss, GCL (Eq. 6) and varifocal loss (Eq. 7) against float64 brute force."""

import math

import pytest
import torch

from rankdetr.modeling.losses import giou_aware_focal_loss, sigmoid_focal_loss, varifocal_loss
from tests import reference_math as ref


def random_problem(seed, queries=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, queries, classes, generator=g, dtype=torch.float64) * 3
    positive = torch.zeros(2, queries, classes, dtype=torch.bool)
    for b in range(2):
        for q in torch.randperm(queries, generator=g)[: queries // 2].tolist():
            positive[b, q, torch.randint(classes, (1,), generator=g).item()] = True
    quality = torch.rand(2, queries, classes, generator=g, dtype=torch.float64)
    return logits, positive, quality


def brute_force_gcl(logit, is_positive, t, alpha=0.25, gamma=2.0):
    p = ref.sigmoid(logit)
    if is_positive:
        return alpha * abs(t - p) ** gamma * ref.bce(p, t)
    return (1 - alpha) * p**gamma * ref.bce(p, 0.0)


def brute_force_focal(logit, target, alpha=0.25, gamma=2.0):
    p = ref.sigmoid(logit)
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def brute_force_vfl(logit, is_positive, t, alpha=0.75, gamma=2.0):
    p = ref.sigmoid(logit)
    if is_positive:
        return t * ref.bce(p, t)
    return alpha * p**gamma * ref.bce(p, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gcl_matches_eq6_entry_by_entry(seed):
    logits, positive, quality = random_problem(seed)
    loss = giou_aware_focal_loss(logits, positive, quality)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in logits.shape)).tolist():
        i = tuple(index)
        expected = brute_force_gcl(logits[i].item(), bool(positive[i]), quality[i].item())
        assert abs(loss[i].item() - expected) < 1e-10, i


def test_focal_loss_matches_its_definition():
    logits, positive, _ = random_problem(3)
    loss = sigmoid_focal_loss(logits, positive.double())
    for index in torch.cartesian_prod(*(torch.arange(s) for s in logits.shape)).tolist():
        i = tuple(index)
        assert abs(loss[i].item() - brute_force_focal(logits[i].item(), int(positive[i]))) < 1e-10


def test_gcl_reduces_to_focal_loss_when_t_is_one():
    logits, positive, _ = random_problem(4)
    gcl = giou_aware_focal_loss(logits, positive, torch.ones_like(logits))
    torch.testing.assert_close(gcl, sigmoid_focal_loss(logits, positive.double()))


def test_gcl_differs_from_focal_when_t_is_below_one():
    logits, positive, quality = random_problem(5)
    gcl = giou_aware_focal_loss(logits, positive, quality * 0.5)
    focal = sigmoid_focal_loss(logits, positive.double())
    assert not torch.allclose(gcl[positive], focal[positive])
    torch.testing.assert_close(gcl[~positive], focal[~positive])


def test_varifocal_matches_eq7():
    logits, positive, quality = random_problem(6)
    loss = varifocal_loss(logits, positive, quality)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in logits.shape)).tolist():
        i = tuple(index)
        expected = brute_force_vfl(logits[i].item(), bool(positive[i]), quality[i].item())
        assert abs(loss[i].item() - expected) < 1e-10


def test_gcl_gradient_matches_finite_differences():
    logits, positive, quality = random_problem(7, queries=3, classes=2)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: giou_aware_focal_loss(x, positive, quality).sum(), (logits,)
    )
