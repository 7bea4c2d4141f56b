"""The original release's initialisation scheme, shared by the transformer's modules.

The release (detrex's Deformable-DETR transformer) initialises every parameter with more than one
dimension inside the transformer (encoder, decoder layers, the QRL parts, the two-stage
projections) with `xavier_uniform_`, then re-applies each deformable attention's own
initialisation. Biases keep PyTorch's defaults (multi-head attention zeroes its own). The
prediction heads, the RCH biases and the learned content queries live outside the transformer in
the release and keep their own initialisation.
"""

from __future__ import annotations

from torch import nn

from rankdetr.layers.multi_scale_deform_attn import MultiScaleDeformableAttention

__all__ = ["init_like_release_transformer"]


def init_like_release_transformer(*modules: nn.Module) -> None:
    """xavier_uniform_ on every parameter with dim > 1 of `modules`, then Deformable DETR's own
    initialisation of each :class:`MultiScaleDeformableAttention` inside them."""
    for module in modules:
        for parameter in module.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, MultiScaleDeformableAttention):
                sub.reset_parameters()
