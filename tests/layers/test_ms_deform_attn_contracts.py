"""The op's contracts on every kernel: grid_sample's border convention, non-finite attention
weights off the map, determinism, and skipping grad_value when value needs no gradient.

Each case runs the compiled kernel on the CPU and, where there is a GPU, on CUDA, against
`ms_deform_attn_reference` (grid_sample itself) in float64 on the CPU.
"""

import pytest
import torch

from rankdetr.layers import ms_deform_attn, ms_deform_attn_reference
from tests.layers.test_ms_deform_attn import make_inputs, needs_cuda, needs_extension

DEVICES = [
    pytest.param("cpu", marks=needs_extension, id="cpu"),
    pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda], id="cuda"),
]


def run(fn, inputs, device, grad_output=None):
    """Output and the three gradients of fn on `device`, returned on the CPU."""
    value, shapes, starts, locations, weights = (
        (
            t.to(device).requires_grad_(t.is_floating_point())
            if t.is_floating_point()
            else t.to(device)
        )
        for t in inputs
    )
    out = fn(value, shapes, starts, locations, weights)
    grad = torch.ones_like(out) if grad_output is None else grad_output.to(device)
    grads = torch.autograd.grad(out, (value, locations, weights), grad)
    return [t.detach().cpu() for t in (out, *grads)]


def border_inputs():
    """Points exactly at pixel coordinates -1, 0, size - 1 and size on each axis of each level
    (all 16 combinations per level). Sizes are powers of two, so (p + 0.5) / size and the kernels'
    x = l * size - 0.5 are exact and land exactly on the borders."""
    levels = [(8, 4), (1, 2)]  # (h, w)
    value, shapes, starts, _, _ = make_inputs(levels, batch=1, queries=1, heads=2, channels=3)
    per_level = []
    for h, w in levels:
        xs = [(p + 0.5) / w for p in (-1, 0, w - 1, w)]
        ys = [(p + 0.5) / h for p in (-1, 0, h - 1, h)]
        per_level.append(torch.tensor([[x, y] for x in xs for y in ys], dtype=torch.float64))
    locations = torch.stack(per_level)[None, None, None].expand(1, 1, 2, 2, 16, 2).contiguous()
    weights = torch.linspace(0.5, 1.5, 2 * 2 * 16, dtype=torch.float64).view(1, 1, 2, 2, 16)
    return value, shapes, starts, locations, weights


@pytest.mark.parametrize("device", DEVICES)
def test_borders_follow_grid_sample(device):
    inputs = border_inputs()
    grad_output = torch.randn(
        1, 1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    ours = run(ms_deform_attn, inputs, device, grad_output)
    reference = run(ms_deform_attn_reference, inputs, "cpu", grad_output)
    for name, got, want in zip(("output", "value", "locations", "weights"), ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    # The case that told the kernels apart: at x = -1 the sample is 0 but its x-gradient is not.
    x_at_minus_one = reference[2][0, 0, :, 0, 0:4, 0]  # level 0, px = -1, every py
    assert (x_at_minus_one[:, 1:3] != 0).all()  # py = 0 and h - 1: the corner at x = 0 is inside
    assert (reference[0] != 0).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_weights_propagate_as_weight_times_sample(device, bad):
    """Off the map the sample is 0, so a NaN or infinite weight there gives a NaN output row
    (inf * 0) and a NaN location gradient, with weight gradient 0; other rows stay finite. An
    inside point with such a weight is non-finite as weight * sample is."""
    value, shapes, starts, locations, weights = make_inputs([(4, 5), (2, 2)], queries=3)
    locations[0, 1, 0, 0, 0] = torch.tensor([1.5, 0.5], dtype=torch.float64)  # off the map
    weights[0, 1, 0, 0, 0] = bad
    locations[1, 2, 1, 1, 1] = torch.tensor([0.4, 0.6], dtype=torch.float64)  # inside
    weights[1, 2, 1, 1, 1] = bad
    inputs = (value, shapes, starts, locations, weights)
    ours = run(ms_deform_attn, inputs, device)
    reference = run(ms_deform_attn_reference, inputs, "cpu")
    for name, got, want in zip(("output", "value", "locations", "weights"), ours, reference):
        # The same entries are non-finite (at the inside point, inf or NaN depends on the order
        # of the arithmetic); the finite ones agree.
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12, msg=name)
    out, _, grad_locations, grad_weights = ours
    channels = value.shape[-1]
    assert torch.isnan(out[0, 1, :channels]).all()
    assert torch.isfinite(out[0, 1, channels:]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isnan(grad_locations[0, 1, 0, 0, 0]).all()
    assert grad_weights[0, 1, 0, 0, 0] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_value_gradient_is_skipped_when_value_needs_none(device):
    value, shapes, starts, locations, weights = (
        t.to(device) for t in make_inputs([(4, 5), (2, 2)], queries=4)
    )
    locations.requires_grad_()
    weights.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    only = torch.autograd.grad(out.sum(), (locations, weights))
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    full = torch.autograd.grad(out.sum(), (value, locations, weights))
    for got, want in zip(only, full[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    direct = torch.ops.rankdetr.ms_deform_attn_backward(
        value.detach(), shapes, starts, locations.detach(), weights.detach(), torch.ones_like(out),
        False,
    )  # fmt: skip
    assert direct[0].numel() == 0
    torch.testing.assert_close(direct[1], full[1], rtol=0, atol=0)


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@needs_extension
def test_cpu_backward_is_deterministic_and_allowed(deterministic_algorithms):
    """The CPU backward has no atomics (each task owns its slice of grad_value): it runs under
    torch.use_deterministic_algorithms(True) and repeats bit for bit, also on several threads."""
    inputs = make_inputs([(16, 20), (8, 10)], queries=64, heads=4, channels=8, dtype=torch.float32)
    first = run(ms_deform_attn, inputs, "cpu", None)
    second = run(ms_deform_attn, inputs, "cpu", None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@needs_cuda
def test_cuda_backward_alerts_under_deterministic_algorithms(deterministic_algorithms):
    inputs = make_inputs([(4, 5)], queries=4)
    with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
        run(ms_deform_attn, inputs, "cuda")
    # Without grad_value there are no atomics, and nothing to alert about.
    value, shapes, starts, locations, weights = (t.cuda() for t in inputs)
    locations.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    (grad,) = torch.autograd.grad(out.sum(), locations)
    assert torch.isfinite(grad).all()
