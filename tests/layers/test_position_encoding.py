"""Sine position embeddings against a per-pixel float64 computation."""

import math

import torch

from rankdetr.layers.position_encoding import PositionEmbeddingSine, sine_embedding_of_boxes


def brute_force_pixel_embedding(valid_h, valid_w, y, x, feats, temperature=10000.0):
    """The embedding of pixel (y, x) in an image whose unpadded part is valid_h x valid_w."""
    scale, offset, eps = 2 * math.pi, -0.5, 1e-6
    position = [
        ((y + 1) + offset) / (valid_h + eps) * scale,
        ((x + 1) + offset) / (valid_w + eps) * scale,
    ]
    out = []
    for p in position:  # y first, then x
        for i in range(feats):
            angle = p / temperature ** (2 * (i // 2) / feats)
            out.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    return out


def test_pixel_embedding_counts_only_the_unpadded_part():
    feats = 6
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[0, :5, :7] = False  # full image
    mask[1, :3, :4] = False  # 3 x 4 image padded to 5 x 7
    pos = PositionEmbeddingSine(num_pos_feats=feats)(mask)
    assert pos.shape == (2, 2 * feats, 5, 7)
    for b, (h, w) in enumerate([(5, 7), (3, 4)]):
        for y in range(h):
            for x in range(w):
                expected = torch.tensor(brute_force_pixel_embedding(h, w, y, x, feats))
                torch.testing.assert_close(pos[b, :, y, x], expected.float(), atol=1e-5, rtol=0)


def test_box_embedding_embeds_each_coordinate_in_turn():
    feats = 4
    boxes = torch.tensor([[0.1, 0.7, 0.3, 0.05]])
    emb = sine_embedding_of_boxes(boxes, num_pos_feats=feats)
    expected = []
    for coordinate in boxes[0].tolist():
        for i in range(feats):
            angle = coordinate * 2 * math.pi / 10000 ** (2 * (i // 2) / feats)
            expected.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    torch.testing.assert_close(emb[0], torch.tensor(expected), atol=1e-6, rtol=0)
