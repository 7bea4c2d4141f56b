"""ms_deform_attn: compiled kernels and the grid_sample reference against a brute-force sampler.

The brute-force sampler below is written from the definition (bilinear tent weights, zero outside
the map, pixel centres at (i + 0.5) / size) with Python floats, independently of grid_sample and of
the code under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import rankdetr.layers.ms_deform_attn_op as msda_module
from rankdetr._ext import extension_available, extension_has_cuda
from rankdetr.layers import ms_deform_attn, ms_deform_attn_reference

needs_extension = pytest.mark.skipif(
    not extension_available(), reason="rankdetr._C is not built (python setup.py build_ext -i)"
)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and extension_has_cuda()


needs_cuda = pytest.mark.skipif(
    not _cuda_ready(), reason="needs a GPU and rankdetr._C built with its CUDA kernel"
)


def _compiled_forward(*args):
    return torch.ops.rankdetr.ms_deform_attn_forward(*args)


# "kernel" goes through the public function, so it also exercises the autograd registration.
IMPLEMENTATIONS = {
    "kernel": pytest.param(ms_deform_attn, marks=needs_extension, id="kernel"),
    "reference": pytest.param(ms_deform_attn_reference, id="reference"),
}


def make_inputs(
    levels,
    batch=2,
    queries=5,
    heads=2,
    channels=3,
    points=2,
    dtype=torch.float64,
    low=-0.2,
    high=1.2,
    seed=0,
):
    """Random inputs; locations uniform in [low, high]^2 (outside [0, 1] means off the map)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    keys = int(sizes.sum())
    value = torch.randn(batch, keys, heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(
        batch, queries, heads, len(levels), points, 2, generator=generator, dtype=torch.float64
    )
    locations = low + (high - low) * locations
    weights = torch.rand(
        batch, queries, heads, len(levels), points, generator=generator, dtype=torch.float64
    )
    return value.to(dtype), shapes, starts, locations.to(dtype), weights.to(dtype)


def brute_force(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """(N, Lq, H * D) float64, by explicit bilinear interpolation in Python loops."""
    v = value.double().tolist()
    loc = sampling_locations.double().tolist()
    attn = attention_weights.double().tolist()
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    batch, _, heads, channels = value.shape
    queries, levels, points = sampling_locations.shape[1], len(shapes), sampling_locations.shape[4]
    out = torch.zeros(batch, queries, heads, channels, dtype=torch.float64)
    for n in range(batch):
        for q in range(queries):
            for h in range(heads):
                acc = [0.0] * channels
                for lvl in range(levels):
                    height, width = shapes[lvl]
                    for p in range(points):
                        # Pixel i covers [i, i + 1) in pixel units, centre i + 0.5.
                        x = loc[n][q][h][lvl][p][0] * width - 0.5
                        y = loc[n][q][h][lvl][p][1] * height - 0.5
                        a = attn[n][q][h][lvl][p]
                        for yi in range(math.floor(y), math.floor(y) + 2):
                            for xi in range(math.floor(x), math.floor(x) + 2):
                                if not (0 <= xi < width and 0 <= yi < height):
                                    continue
                                tent = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                key = starts[lvl] + yi * width + xi
                                for d in range(channels):
                                    acc[d] += a * tent * v[n][key][h][d]
                out[n, q, h] = torch.tensor(acc, dtype=torch.float64)
    return out.view(batch, queries, heads * channels)


CASES = {
    "one-level": {"levels": [(4, 5)]},
    "several-levels": {"levels": [(5, 7), (3, 4), (2, 2), (1, 1)]},
    "one-by-one-only": {"levels": [(1, 1), (1, 1)], "queries": 4},
    "batch-1": {"levels": [(6, 3), (2, 5)], "batch": 1, "heads": 3, "points": 3},
    "inside-only": {"levels": [(4, 6), (2, 3)], "low": 0.0, "high": 1.0},
    "far-outside": {"levels": [(3, 3), (2, 4)], "low": -1.5, "high": 2.5},
    "channels-16": {"levels": [(3, 4), (2, 2)], "channels": 16, "queries": 2},
    "channels-32": {"levels": [(3, 4), (2, 2)], "channels": 32, "queries": 2},
    "channels-64": {"levels": [(3, 4), (1, 1)], "channels": 64, "queries": 2, "heads": 1},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_matches_brute_force(impl, case):
    inputs = make_inputs(**CASES[case], seed=len(case))
    torch.testing.assert_close(impl(*inputs), brute_force(*inputs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_float32_matches_brute_force(impl):
    inputs = make_inputs([(5, 6), (3, 3), (1, 2)], channels=32, dtype=torch.float32)
    torch.testing.assert_close(impl(*inputs).double(), brute_force(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_non_contiguous_inputs(impl):
    value, shapes, starts, locations, weights = make_inputs([(4, 5), (2, 3)], heads=3)
    # Same numbers, non-contiguous memory: a permuted copy, a strided slice, a transposed copy.
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    locations_nc = torch.stack([locations, torch.full_like(locations, 7.0)], -1)[..., 0]
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = torch.stack([shapes, shapes], 0)[0].t().contiguous().t()
    assert not any(
        t.is_contiguous() for t in (value_nc, locations_nc, weights_nc, shapes_nc)
    ), "the test must feed non-contiguous tensors"
    expected = brute_force(value, shapes, starts, locations, weights)
    out = impl(value_nc, shapes_nc, starts, locations_nc, weights_nc)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_int32_tables(impl):
    value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 5)])
    out = impl(value, shapes.int(), starts.int(), locations, weights)
    torch.testing.assert_close(out, brute_force(value, shapes, starts, locations, weights))


def test_falls_back_to_reference_without_extension(monkeypatch):
    monkeypatch.setattr(msda_module, "_HAS_EXTENSION", False)
    inputs = make_inputs([(3, 4), (1, 2)])
    torch.testing.assert_close(ms_deform_attn(*inputs), brute_force(*inputs))


def test_half_precision_on_cpu_uses_reference():
    inputs = make_inputs([(3, 4), (2, 2)], channels=8, dtype=torch.bfloat16)
    expected = brute_force(*inputs)
    torch.testing.assert_close(ms_deform_attn(*inputs).double(), expected, rtol=0.02, atol=0.05)


# ----------------------------------------------------------------------------------------------
# Gradients


def _requires_grad(inputs):
    value, shapes, starts, locations, weights = inputs
    return (
        value.clone().requires_grad_(),
        shapes,
        starts,
        locations.clone().requires_grad_(),
        weights.clone().requires_grad_(),
    )


@pytest.mark.parametrize("channels", [3, 32])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_gradcheck(impl, channels):
    inputs = _requires_grad(
        make_inputs([(3, 4), (2, 3), (1, 1)], batch=2, queries=3, heads=2, channels=channels)
    )
    # Bilinear sampling has kinks on pixel centres; random points sit far from them compared with
    # the finite-difference step, so the numerical gradient is well defined.
    assert torch.autograd.gradcheck(impl, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_extension
@pytest.mark.parametrize("channels", [5, 16, 32, 64])
def test_float32_gradients_match_reference(channels):
    levels = [(10, 13), (5, 7), (3, 4), (1, 1)]
    inputs = make_inputs(
        levels, batch=2, queries=40, heads=4, channels=channels, points=4, dtype=torch.float32
    )
    ours = _requires_grad(inputs)
    ref = _requires_grad(inputs)
    out, out_ref = ms_deform_attn(*ours), ms_deform_attn_reference(*ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (ours[0], ours[3], ours[4]), grad)
    grads_ref = torch.autograd.grad(out_ref, (ref[0], ref[3], ref[4]), grad)
    for name, got, want in zip(("value", "locations", "weights"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


@needs_extension
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_gradients_with_heads_split_across_threads(threads):
    # With fewer (batch, level) pairs than threads, backward splits the heads into groups; H = 3
    # makes the last group smaller than the others.
    inputs = make_inputs([(6, 7)], batch=1, queries=30, heads=3, channels=8, points=3)
    ours, ref = _requires_grad(inputs), _requires_grad(inputs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ms_deform_attn(*ours)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (ours[0], ours[3], ours[4]), grad)
    finally:
        torch.set_num_threads(previous)
    out_ref = ms_deform_attn_reference(*ref)
    grads_ref = torch.autograd.grad(out_ref, (ref[0], ref[3], ref[4]), grad)
    torch.testing.assert_close(out, out_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


@needs_extension
def test_gradient_of_one_input_only():
    value, shapes, starts, locations, weights = make_inputs([(4, 4), (2, 2)])
    locations.requires_grad_()
    (grad,) = torch.autograd.grad(
        ms_deform_attn(value, shapes, starts, locations, weights).sum(), locations
    )
    (grad_ref,) = torch.autograd.grad(
        ms_deform_attn_reference(value, shapes, starts, locations, weights).sum(), locations
    )
    torch.testing.assert_close(grad, grad_ref)


@needs_extension
def test_baseline_isa_copy_matches_reference():
    # On x86 the kernels are also compiled for AVX2 and that copy is picked at run time; run the
    # baseline copy in a fresh process (the choice is made once per process) and compare.
    script = textwrap.dedent("""
        import torch
        from rankdetr.layers import ms_deform_attn, ms_deform_attn_reference
        from tests.layers.test_ms_deform_attn import _requires_grad, make_inputs
        inputs = make_inputs([(5, 6), (2, 3)], queries=7, heads=2, channels=32, points=2)
        ours, ref = _requires_grad(inputs), _requires_grad(inputs)
        out, out_ref = ms_deform_attn(*ours), ms_deform_attn_reference(*ref)
        torch.testing.assert_close(out, out_ref)
        out.sum().backward()
        out_ref.sum().backward()
        for i in (0, 3, 4):
            torch.testing.assert_close(ours[i].grad, ref[i].grad)
        print("ok")
        """)
    env = dict(os.environ, RANKDETR_NO_AVX2="1")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ----------------------------------------------------------------------------------------------
# Input validation


def _replace(inputs, index, tensor):
    inputs = list(inputs)
    inputs[index] = tensor
    return inputs


BAD_INPUTS = {
    "value-3d": (
        lambda i: _replace(i, 0, i[0][..., 0]),
        ValueError,
        r"value must be \(N, S, H, D\)",
    ),
    "locations-last-dim": (
        lambda i: _replace(i, 3, torch.cat([i[3], i[3][..., :1]], -1)),
        ValueError,
        r"sampling_locations must be \(N, Lq, H, L, P, 2\)",
    ),
    "locations-5d": (lambda i: _replace(i, 3, i[3][0]), ValueError, r"sampling_locations must be"),
    "batch-mismatch": (
        lambda i: _replace(i, 0, torch.cat([i[0], i[0]])),
        ValueError,
        r"batch N and heads H disagree.*N=4.*N=2",
    ),
    "heads-mismatch": (
        lambda i: _replace(i, 0, i[0][:, :, :1]),
        ValueError,
        r"batch N and heads H disagree.*H=1.*H=2",
    ),
    "weights-shape": (
        lambda i: _replace(i, 4, i[4][..., :1]),
        ValueError,
        r"attention_weights must be \(N, Lq, H, L, P\)",
    ),
    "weights-4d": (lambda i: _replace(i, 4, i[4][..., 0]), ValueError, r"attention_weights must"),
    "levels-mismatch": (
        lambda i: _replace(i, 1, i[1][:1]),
        ValueError,
        r"spatial_shapes must be \(L, 2\) = \(2, 2\)",
    ),
    "start-index-length": (
        lambda i: _replace(i, 2, i[2][:1]),
        ValueError,
        r"level_start_index must be \(L,\) = \(2,\)",
    ),
    "shapes-sum": (
        lambda i: _replace(i, 1, torch.tensor([[3, 4], [2, 3]])),
        ValueError,
        r"sum\(h \* w\) = 18 keys but value has S = 16",
    ),
    "start-index-values": (
        lambda i: _replace(i, 2, torch.tensor([0, 11])),
        ValueError,
        r"level_start_index \[0, 11\] does not match .* start at \[0, 12\]",
    ),
    "float-shapes": (
        lambda i: _replace(i, 1, i[1].float()),
        TypeError,
        r"spatial_shapes must be an integer",
    ),
    "float-start-index": (
        lambda i: _replace(i, 2, i[2].double()),
        TypeError,
        r"level_start_index must be an integer",
    ),
    "mixed-float-dtypes": (
        lambda i: _replace(i, 4, i[4].float()),
        TypeError,
        r"share one dtype.*attention_weights torch.float32",
    ),
    "integer-value": (lambda i: _replace(i, 0, i[0].long()), TypeError, r"value must be floating"),
    "mixed-devices": (
        lambda i: _replace(i, 0, i[0].to("meta")),
        ValueError,
        r"one device.*value on meta.*sampling_locations on cpu",
    ),
    "not-a-tensor": (
        lambda i: _replace(i, 1, [[3, 4], [2, 2]]),
        TypeError,
        r"spatial_shapes must be a torch.Tensor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs(case):
    mutate, error, message = BAD_INPUTS[case]
    inputs = mutate(make_inputs([(3, 4), (2, 2)]))
    with pytest.raises(error, match=message):
        ms_deform_attn(*inputs)


@needs_extension
def test_compiled_op_rejects_levels_outside_value():
    value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 2)])
    # Direct torch.ops calls skip the Python checks; the kernel must still refuse to read past S.
    with pytest.raises(RuntimeError, match="does not fit in value"):
        _compiled_forward(value, shapes, torch.tensor([0, 14]), locations, weights)
    with pytest.raises(RuntimeError, match="does not fit in value"):
        _compiled_forward(value, torch.tensor([[3, 4], [3, 3]]), starts, locations, weights)


@needs_extension
@pytest.mark.parametrize(
    "levels, starts, keys",
    [
        ([(3, 4), (2, 2)], [0, 0], 12),  # the second level reuses the first level's keys
        ([(3, 4), (2, 2)], [5, 0], 17),  # out of order, with keys in no level (a gap)
    ],
    ids=["overlapping", "gap"],
)
def test_compiled_op_with_levels_that_do_not_tile_value(levels, starts, keys):
    # The public function rejects such tables; the op itself must still be right (no race between
    # levels writing the same grad_value rows, untouched rows zero).
    shapes, starts = torch.tensor(levels), torch.tensor(starts)
    _, _, _, locations, weights = make_inputs(levels, heads=3, channels=8)
    value = torch.randn(2, keys, 3, 8, dtype=torch.float64)
    ours = _requires_grad((value, shapes, starts, locations, weights))
    ref = _requires_grad((value, shapes, starts, locations, weights))
    out = _compiled_forward(*ours)
    out_ref = ms_deform_attn_reference(*ref)
    torch.testing.assert_close(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for i in (0, 3, 4):
        torch.testing.assert_close(ours[i].grad, ref[i].grad)


# ----------------------------------------------------------------------------------------------
# Non-finite inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_non_finite_location_poisons_only_its_row(impl, bad):
    inputs = _requires_grad(make_inputs([(4, 5), (2, 2)], low=0.0, high=1.0))
    clean = impl(*inputs).detach()
    value, shapes, starts, locations, weights = inputs
    locations = locations.detach().clone()
    locations[1, 2, 0, 1, 1, 0] = bad  # batch 1, query 2, head 0 -> output[1, 2, :D]
    locations.requires_grad_()
    out = impl(value, shapes, starts, locations, weights)
    channels = value.shape[-1]
    assert torch.isnan(out[1, 2, :channels]).all()
    poisoned = torch.zeros_like(out, dtype=torch.bool)
    poisoned[1, 2, :channels] = True
    torch.testing.assert_close(out[~poisoned], clean[~poisoned])
    # Backward runs and leaves the gradients of unaffected points finite.
    out.masked_fill(poisoned, 0).sum().backward()
    assert torch.isfinite(locations.grad[0]).all()
    assert torch.isfinite(weights.grad[0]).all()


@needs_extension
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30, -1e30])
def test_kernel_survives_non_finite_and_huge_locations_everywhere(bad):
    inputs = _requires_grad(make_inputs([(4, 5), (2, 2), (1, 1)]))
    value, shapes, starts, locations, weights = inputs
    locations = torch.full_like(locations, bad).requires_grad_()
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    if math.isfinite(bad):
        assert (out == 0).all()  # far off every map
    else:
        assert torch.isnan(out).all()
    out.backward(torch.ones_like(out))
    assert (value.grad == 0).all()  # nothing was read, so nothing is scattered back
    assert locations.grad.shape == locations.shape and weights.grad.shape == weights.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS.values()))
def test_non_finite_value_propagates(impl, bad):
    value, shapes, starts, locations, weights = make_inputs([(3, 3)], queries=2, heads=1, points=1)
    value[0, 4] = bad  # the centre key of batch 0
    locations[0, 0] = 0.5  # query 0 samples exactly the centre pixel
    locations[0, 1] = 0.05  # query 1 samples the top-left corner, away from the centre key
    weights.fill_(1.0)
    out = impl(value, shapes, starts, locations, weights)
    assert not torch.isfinite(out[0, 0]).any()
    assert torch.isfinite(out[0, 1]).all() and torch.isfinite(out[1]).all()


# ----------------------------------------------------------------------------------------------
# torch.compile


@needs_extension
def test_torch_compile_traces_through_the_op():
    torch._dynamo.reset()
    inputs = _requires_grad(make_inputs([(4, 5), (2, 2)], channels=4))

    def layer(value, shapes, starts, locations, weights):
        return ms_deform_attn(value * 2, shapes, starts, locations, weights.softmax(-1)).tanh()

    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(*inputs)
    traced = [str(node.target) for graph in backend.graphs for node in graph.graph.nodes]
    assert any("rankdetr.ms_deform_attn_forward" in target for target in traced), traced
    out.sum().backward()
    grads = [inputs[i].grad.clone() for i in (0, 3, 4)]
    for i in (0, 3, 4):
        inputs[i].grad = None
    expected = layer(*inputs)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, i in zip(grads, (0, 3, 4)):
        torch.testing.assert_close(got, inputs[i].grad)


# ----------------------------------------------------------------------------------------------
# CUDA (compared with the CPU kernel)

CUDA_TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
@pytest.mark.parametrize("case", ["several-levels", "far-outside", "channels-32"])
def test_cuda_matches_cpu(case, dtype):
    spec = dict(CASES[case], queries=16, seed=3)
    # Round the inputs to the CUDA dtype first so both devices see the same numbers.
    cpu_inputs = [t.to(dtype).float() if t.is_floating_point() else t for t in make_inputs(**spec)]
    cpu = _requires_grad(cpu_inputs)
    cuda = _requires_grad(
        [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in cpu_inputs]
    )
    out_cpu, out_cuda = ms_deform_attn(*cpu), ms_deform_attn(*cuda)
    assert out_cuda.dtype == dtype
    scale = out_cpu.abs().max().item()
    tol = CUDA_TOLERANCES[dtype]
    torch.testing.assert_close(
        out_cuda.float().cpu(), out_cpu, rtol=tol["rtol"], atol=tol["atol"] * scale
    )
    grad = torch.randn_like(out_cpu).to(dtype).float()
    grads_cpu = torch.autograd.grad(out_cpu, (cpu[0], cpu[3], cpu[4]), grad)
    grads_cuda = torch.autograd.grad(out_cuda, (cuda[0], cuda[3], cuda[4]), grad.to("cuda", dtype))
    for name, got, want in zip(("value", "locations", "weights"), grads_cuda, grads_cpu):
        assert got.dtype == dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(
            got.float().cpu(),
            want,
            rtol=tol["rtol"],
            atol=tol["atol"] * max(scale, 1.0),
            msg=f"grad of {name} ({dtype})",
        )
