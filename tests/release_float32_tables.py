"""The original release's float32 tables, patched into our model: float32 whatever the run's dtype.

Deformable DETR and the original Rank-DETR release build these tables in float32 in every run:
the sine position embedding of the padding mask, the box sine-embedding frequencies, the
two-stage proposal grid with its logits, and the valid ratios (which the encoder reference points
follow); its GIoU-aware focal loss weights alpha / 1 - alpha as a float32 table too. Our code
builds them in the run's dtype (at least float32). With these patched in, a float32 run must be
bit-identical to ours (`test_float64_end_to_end.py`), and a float64 run shows the float32
intermediates that a float64 run must not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rankdetr.layers import position_encoding
from rankdetr.modeling import criterion, detector_base, dino, two_stage


def release_position_embedding(self, padding_mask: torch.Tensor, dtype=None) -> torch.Tensor:
    """PositionEmbeddingSine.forward with the release's float32 table (`dtype` ignored)."""
    valid = (~padding_mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    if self.normalize:
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
    pos_y = position_encoding._interleaved_sin_cos(y, self.num_pos_feats, self.temperature)
    pos_x = position_encoding._interleaved_sin_cos(x, self.num_pos_feats, self.temperature)
    return torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)


def release_interleaved_sin_cos(positions: torch.Tensor, channels: int, temperature: float):
    """Sine / cosine pairs with a float32 wavelength table."""
    pair = torch.arange(channels, dtype=torch.float32, device=positions.device) // 2
    wavelengths = temperature ** (2 * pair / channels)
    angles = positions[..., None] / wavelengths
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


def release_grid_proposals(padding_mask, spatial_shapes, base_size: float = 0.05, dtype=None):
    """The two-stage grid and its logits in float32 (`dtype` ignored)."""
    n = padding_mask.shape[0]
    boxes, start = [], 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).to(torch.float32)
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).to(torch.float32)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=padding_mask.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=padding_mask.device) + 0.5,
            indexing="ij",
        )
        cx = xs.reshape(1, -1) / valid_w[:, None]
        cy = ys.reshape(1, -1) / valid_h[:, None]
        size = torch.full_like(cx, base_size * 2.0**level)
        boxes.append(torch.stack([cx, cy, size, size], dim=-1))
        start += h * w
    proposals = torch.cat(boxes, dim=1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    logits = torch.log(proposals / (1 - proposals))
    return logits.masked_fill(~valid[..., None], float("inf")), valid


def release_valid_ratio(mask: torch.Tensor, dtype=None) -> torch.Tensor:
    """Unpadded fractions (w, h) in float32 (`dtype` ignored)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def release_giou_aware_focal_loss(logits, positive, quality, alpha=0.25, gamma=2.0):
    """Eq. 6 with the positive / negative weights as a float32 table (Python scalars)."""
    prob = logits.sigmoid()
    target = torch.where(positive, quality.to(logits.dtype), torch.zeros_like(logits))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    modulation = torch.where(positive, (target - prob).abs().pow(gamma), prob.pow(gamma))
    return torch.where(positive, alpha, 1 - alpha) * modulation * bce


def patch_release_float32_tables(monkeypatch) -> None:
    """Every table above in place of ours, wherever our code looks it up."""
    monkeypatch.setattr(
        position_encoding.PositionEmbeddingSine, "forward", release_position_embedding
    )
    monkeypatch.setattr(position_encoding, "_interleaved_sin_cos", release_interleaved_sin_cos)
    monkeypatch.setattr(two_stage, "grid_proposals", release_grid_proposals)
    monkeypatch.setattr(dino, "grid_proposals", release_grid_proposals)
    monkeypatch.setattr(detector_base, "_valid_ratio", release_valid_ratio)
    monkeypatch.setattr(criterion, "giou_aware_focal_loss", release_giou_aware_focal_loss)
