"""MultiScaleDeformableAttention: checkpoint names, initialisation, sampling geometry, masking."""

import math

import pytest
import torch

from rankdetr.layers.multi_scale_deform_attn import MultiScaleDeformableAttention
from tests.reference_state_dict import reference_shapes


@pytest.mark.parametrize(
    "prefix",
    [
        "transformer.encoder.layers.0.attentions.0.",
        "transformer.decoder.layers.5.attentions.1.",
    ],
)
def test_parameter_names_and_shapes_match_the_original_release(prefix):
    module = MultiScaleDeformableAttention(embed_dim=256, num_heads=8, num_levels=4, num_points=4)
    ours = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert ours == reference_shapes(prefix)


def test_initial_offsets_point_each_head_in_its_own_direction():
    heads, levels, points = 8, 3, 4
    module = MultiScaleDeformableAttention(
        embed_dim=32, num_heads=heads, num_levels=levels, num_points=points
    )
    bias = module.sampling_offsets.bias.view(heads, levels, points, 2)
    for h in range(heads):
        angle = 2 * math.pi * h / heads
        x, y = math.cos(angle), math.sin(angle)
        scale = max(abs(x), abs(y))
        for level in range(levels):
            for p in range(points):
                expected = torch.tensor([x / scale * (p + 1), y / scale * (p + 1)])
                torch.testing.assert_close(bias[h, level, p], expected, atol=1e-6, rtol=0)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0


def make_levels(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def identity_module(channels, heads, levels, points):
    """Projections set to the identity, no offsets, uniform attention: easy to predict by hand."""
    module = MultiScaleDeformableAttention(
        embed_dim=channels, num_heads=heads, num_levels=levels, num_points=points
    ).double()
    with torch.no_grad():
        for linear in (module.value_proj, module.output_proj):
            linear.weight.copy_(torch.eye(channels))
            linear.bias.zero_()
        module.sampling_offsets.bias.zero_()
    return module


def test_points_at_pixel_centres_read_those_pixels():
    shapes = [(3, 5), (2, 2), (1, 1)]
    spatial_shapes, level_start_index, num_keys = make_levels(shapes)
    channels, heads, points = 8, 2, 3
    module = identity_module(channels, heads, len(shapes), points)
    value = torch.randn(1, num_keys, channels, dtype=torch.float64)
    pixels = [(1, 4), (0, 1), (0, 0)]  # (row, column) read on each level
    refs = torch.tensor(
        [[[(col + 0.5) / w, (row + 0.5) / h] for (row, col), (h, w) in zip(pixels, shapes)]],
        dtype=torch.float64,
    )[:, None].expand(1, 1, len(shapes), 2)
    query = torch.randn(1, 1, channels, dtype=torch.float64)
    out = module(query, value, refs, spatial_shapes, level_start_index)
    # Uniform attention over L * P points, all points of a level at the same pixel.
    expected = sum(
        value[0, int(start) + row * w + col]
        for (row, col), (h, w), start in zip(pixels, shapes, level_start_index)
    ) / len(shapes)
    torch.testing.assert_close(out[0, 0], expected)


def test_point_offsets_are_in_pixels_of_each_level():
    shapes = [(4, 8), (2, 4)]
    spatial_shapes, _, _ = make_levels(shapes)
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=1)
    with torch.no_grad():
        module.sampling_offsets.bias.copy_(torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0, 0.5, 2.0, 2.0]))
    refs = torch.full((1, 1, 2, 2), 0.5)
    locations = module.sampling_locations(torch.zeros(1, 1, 8), refs, spatial_shapes)
    offsets = module.sampling_offsets.bias.view(2, 2, 1, 2)
    for head in range(2):
        for level, (h, w) in enumerate(shapes):
            dx, dy = offsets[head, level, 0].tolist()
            expected = torch.tensor([0.5 + dx / w, 0.5 + dy / h])
            torch.testing.assert_close(locations[0, 0, head, level, 0], expected)


def test_box_offsets_scale_with_box_size_over_points():
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=1, num_points=4)
    boxes = torch.tensor([[[[0.4, 0.6, 0.2, 0.1]]]])  # (N, Lq, L, 4) as (cx, cy, w, h)
    locations = module.sampling_locations(torch.zeros(1, 1, 8), boxes, torch.tensor([[5, 5]]))
    offsets = module.sampling_offsets.bias.view(2, 1, 4, 2)
    for head in range(2):
        for p in range(4):
            dx, dy = offsets[head, 0, p].tolist()
            expected = torch.tensor([0.4 + dx / 4 * 0.2 * 0.5, 0.6 + dy / 4 * 0.1 * 0.5])
            torch.testing.assert_close(locations[0, 0, head, 0, p], expected)


def test_padded_values_are_not_read():
    shapes = [(4, 4), (2, 2)]
    spatial_shapes, level_start_index, num_keys = make_levels(shapes)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    query = torch.randn(2, 5, 16)
    refs = torch.rand(2, 5, 2, 2)
    value = torch.randn(2, num_keys, 16)
    mask = torch.rand(2, num_keys) < 0.3
    out = module(query, value, refs, spatial_shapes, level_start_index, mask)
    changed = value.masked_fill(mask[..., None], 1e3)
    out_changed = module(query, changed, refs, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(out, out_changed)


def test_gradients_reach_every_parameter_and_input():
    shapes = [(4, 6), (2, 3)]
    spatial_shapes, level_start_index, num_keys = make_levels(shapes)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    with torch.no_grad():  # non-zero so that gradients flow through offsets and weights
        module.sampling_offsets.weight.normal_(std=0.1)
        module.attention_weights.weight.normal_(std=0.1)
    query = torch.randn(2, 7, 16, requires_grad=True)
    value = torch.randn(2, num_keys, 16, requires_grad=True)
    refs = torch.rand(2, 7, 2, 4, requires_grad=True)
    module(query, value, refs, spatial_shapes, level_start_index).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for tensor in (query, value, refs):
        assert tensor.grad.abs().sum() > 0


def test_bad_reference_shape_is_named():
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=1, num_points=1)
    with pytest.raises(ValueError, match="reference_points must end in 2"):
        module.sampling_locations(
            torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 3), torch.tensor([[2, 2]])
        )
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=10, num_heads=3)
