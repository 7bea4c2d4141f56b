"""A small multi-layer perceptron (the box heads)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "inverse_sigmoid"]


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them, held in `layers` (the release's names)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x), with x and 1 - x clamped to at least eps so that boxes at the border stay finite.

    eps = 1e-3 is the original release's (detrex's) value: logits are bounded by about +-6.9, so a
    box coordinate at 0 or 1 refines from there. The released weights were trained with it, and
    it changes boxes near the image border, so it is kept.
    """
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
