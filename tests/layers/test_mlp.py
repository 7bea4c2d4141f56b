"""MLP and inverse_sigmoid (the box refinement's logit), with the release's clamp."""

import math

import pytest
import torch

from rankdetr.layers.mlp import MLP, inverse_sigmoid


def test_inverse_sigmoid_inverts_and_clamps_at_the_releases_1e_3():
    """logit(x) = log(x / (1 - x)) inside [1e-3, 1 - 1e-3]; outside, x and 1 - x are clamped at
    1e-3 (the release's detrex value), so 0 and 1 give -+log(999) -- with 1e-5, they would give
    -+11.5 and boxes at the border would refine differently."""
    x = torch.tensor(
        [0.0, 1e-4, 1e-3, 0.2, 0.5, 0.9, 1 - 1e-4, 1.0, -0.5, 1.5], dtype=torch.float64
    )
    got = inverse_sigmoid(x)
    expected = []
    for value in x.tolist():
        value = min(max(value, 0.0), 1.0)
        expected.append(math.log(max(value, 1e-3) / max(1 - value, 1e-3)))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert got[0].item() == pytest.approx(-math.log(1000.0), rel=1e-12)  # log(1e-3 / 1)
    assert got[7].item() == pytest.approx(math.log(1000.0), rel=1e-12)
    middle = torch.tensor([0.01, 0.3, 0.77], dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(middle).sigmoid(), middle, rtol=1e-14, atol=0)


def test_mlp_is_linear_relu_linear():
    torch.manual_seed(0)
    mlp = MLP(4, 8, 2, 3)
    x = torch.randn(5, 4)
    layers = mlp.layers
    expected = layers[2](torch.relu(layers[1](torch.relu(layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)
    assert [(m.in_features, m.out_features) for m in layers] == [(4, 8), (8, 8), (8, 2)]
