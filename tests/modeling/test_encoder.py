"""Deformable encoder: reference points, shapes, and independence from padded content."""

import torch

from rankdetr.modeling.encoder import DeformableEncoder, encoder_reference_points


def levels(shapes):
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def test_reference_points_are_pixel_centres_of_the_unpadded_part():
    spatial_shapes, starts, total = levels([(4, 6), (2, 3)])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 0.75]]])  # (N, L, (w, h))
    points = encoder_reference_points(spatial_shapes, ratios)
    assert points.shape == (2, total, 2, 2)
    for n in range(2):
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            rw, rh = ratios[n, level].tolist()
            for i in range(h):
                for j in range(w):
                    index = int(starts[level]) + i * w + j
                    x, y = (j + 0.5) / (rw * w), (i + 0.5) / (rh * h)
                    for target_level in range(2):
                        tw, th = ratios[n, target_level].tolist()
                        expected = torch.tensor([x * tw, y * th])
                        torch.testing.assert_close(points[n, index, target_level], expected)


def test_encoder_output_ignores_padded_content():
    torch.manual_seed(0)
    spatial_shapes, starts, total = levels([(6, 8), (3, 4)])
    encoder = DeformableEncoder(
        num_layers=2, embed_dim=32, num_heads=4, num_levels=2, num_points=2, ffn_dim=64
    ).eval()
    src = torch.randn(1, total, 32)
    pos = torch.randn(1, total, 32)
    mask = torch.zeros(1, total, dtype=torch.bool)
    for level, (h, w) in enumerate(spatial_shapes.tolist()):  # right half of each level padded
        block = mask[0, int(starts[level]) : int(starts[level]) + h * w].view(h, w)
        block[:, w // 2 :] = True
    ratios = torch.tensor([[[0.5, 1.0], [0.5, 1.0]]])
    out = encoder(src, pos, spatial_shapes, starts, ratios, mask)
    changed = src.masked_fill(mask[..., None], 7.0)
    out_changed = encoder(changed, pos, spatial_shapes, starts, ratios, mask)
    assert out.shape == (1, total, 32)
    torch.testing.assert_close(out[~mask], out_changed[~mask])
