"""Decoder layer: grouped self-attention equals H-DETR's masked attention over all queries."""

import torch
from torch import nn

from rankdetr.modeling.decoder_layer import DeformableDecoderLayer, grouped_self_attention


def test_grouped_attention_equals_block_diagonal_masked_attention():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True).double()
    query = torch.randn(2, 9, 16, dtype=torch.float64)
    value = torch.randn(2, 9, 16, dtype=torch.float64)
    groups = [3, 6]
    mask = torch.ones(9, 9, dtype=torch.bool)  # True = may not attend
    mask[:3, :3] = False
    mask[3:, 3:] = False
    expected = attn(query, query, value, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(grouped_self_attention(attn, query, value, groups), expected)
    # One group: plain attention.
    plain = attn(query, query, value, need_weights=False)[0]
    torch.testing.assert_close(grouped_self_attention(attn, query, value, [9]), plain)


def test_groups_do_not_see_each_other():
    torch.manual_seed(1)
    layer = DeformableDecoderLayer(
        embed_dim=16, num_heads=4, num_levels=1, num_points=2, ffn_dim=32
    )
    memory = torch.randn(1, 12, 16)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])
    query, pos = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    boxes = torch.rand(1, 5, 1, 4) * 0.5 + 0.25
    out = layer(query, pos, boxes, memory, shapes, starts, None, [2, 3])
    changed = query.clone()
    changed[:, 2:] += 1.0  # change the second group only
    out_changed = layer(changed, pos, boxes, memory, shapes, starts, None, [2, 3])
    torch.testing.assert_close(out[:, :2], out_changed[:, :2])
    assert not torch.allclose(out[:, 2:], out_changed[:, 2:])
