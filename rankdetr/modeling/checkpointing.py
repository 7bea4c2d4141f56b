"""Activation checkpointing of transformer layers (`model.activation_checkpointing`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_layer"]


def run_layer(layer: nn.Module, *args, activation_checkpointing: bool = False):
    """layer(*args). With `activation_checkpointing`, in training with autograd on, the layer's
    intermediate activations are not kept: backward recomputes them (non-reentrant
    torch.utils.checkpoint, which restores the RNG state, so dropout draws the same masks and
    the gradients are those of a plain run)."""
    if activation_checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
