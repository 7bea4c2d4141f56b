"""The CPU kernel's AVX2 copy against its baseline (scalar-ISA) copy, on the sampling edge cases.

Both copies compile the same source and call the same sampling core (csrc/ms_deform_attn/
sampling.h: pixel coordinates, clamping, corners and weights, location gradient), but the AVX2 copy
is built with AVX2+FMA enabled, and the compiler contracts multiply-adds into FMAs there. In the
loops over channels that only moves the last bits; in the pixel coordinate l * w - 0.5 it moved
points lying exactly on a pixel boundary onto other corners (a location gradient of 47 against 0
before sampling.h spelled the fused multiply-add out). The inputs below sit on those boundaries:
points exactly at pixel -1 (a zero-weight corner inside) and -2 (all outside), at the far border,
normalised 0 and 1, the floats either side of each, NaN and infinite locations, huge ones, and 1x1
levels. Both copies must pick the same corners: the same NaN and the same exact zeros in every
output and gradient, and otherwise values a few rounding errors apart.

The copy is chosen once per process (RANKDETR_NO_AVX2=1 forces the baseline one), so each runs in
its own subprocess (one per copy, for every case of the module). D = 32 takes a kernel specialised
for that channel count, D = 5 the generic one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rankdetr._ext import extension_available

ROOT = Path(__file__).resolve().parents[2]
LEVELS = [(5, 7), (1, 1), (3, 2), (1, 4), (2, 1)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Measured on these inputs: at most 7e-6 (float32) and 2e-15 (float64) relative to 1 + |value|.
TOLERANCE = {"float32": 5e-5, "float64": 1e-12}
NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


needs_both_copies = pytest.mark.skipif(
    not (extension_available() and _cpu_has_avx2()),
    reason="needs rankdetr._C and an x86 CPU with AVX2+FMA (else only one copy exists or runs)",
)


def _axis_values(size: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalised coordinates whose pixel coordinate (l * size - 0.5) sits on the edge cases."""
    pixels = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, size - 1.0, size - 0.5, size, size + 1.0]
    exact = torch.tensor([(p + 0.5) / size for p in pixels], dtype=torch.float64).to(dtype)
    # The float either side of each: whichever of the three lands exactly on the boundary.
    up = torch.nextafter(exact, torch.tensor(float("inf"), dtype=dtype))
    down = torch.nextafter(exact, torch.tensor(-float("inf"), dtype=dtype))
    special = [0.0, -0.0, 1.0, 0.5, 1e30, -1e30]
    return torch.cat([exact, up, down, torch.tensor(special, dtype=dtype)])


def edge_inputs(dtype: torch.dtype, channels: int, seed: int = 0):
    """Op inputs whose locations are random pairs of edge-case (and random) coordinates.

    1% of the coordinates are non-finite: rarely enough to leave most output rows finite.
    """
    generator = torch.Generator().manual_seed(seed)
    batch, queries, heads, points = 2, 24, 2, 6
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator)
    locations = torch.empty(batch, queries, heads, len(LEVELS), points, 2, dtype=dtype)
    for level, (h, w) in enumerate(LEVELS):
        for axis, size in ((0, w), (1, h)):
            pool = _axis_values(size, dtype)
            random = torch.rand(pool.numel(), generator=generator, dtype=torch.float64)
            pool = torch.cat([pool, (-0.2 + 1.4 * random).to(dtype)])
            shape = (batch, queries, heads, points)
            picks = torch.randint(pool.numel(), shape, generator=generator)
            locations[:, :, :, level, :, axis] = pool[picks]
    bad = torch.rand(locations.shape, generator=generator) < 0.01
    picks = torch.randint(len(NON_FINITE), locations.shape, generator=generator)
    locations[bad] = torch.tensor(NON_FINITE, dtype=dtype)[picks[bad]]
    locations[:, -1] = 1.5  # the last query samples nothing: its output is exactly 0
    weights = torch.rand(batch, queries, heads, len(LEVELS), points, generator=generator)
    grad_output = torch.randn(batch, queries, heads * channels, generator=generator)
    return (
        value.to(dtype),
        shapes,
        starts,
        locations,
        weights.to(dtype),
        grad_output.to(dtype),
    )


# Runs in a fresh process: computes the op on edge_inputs for every (dtype, channels) case and
# saves every output, keyed by case.
CASES = [(dtype_name, channels) for dtype_name in DTYPES for channels in (5, 32)]
_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import rankdetr._C  # noqa: F401  (registers torch.ops.rankdetr)
    from tests.layers.test_ms_deform_attn_sampling_core import CASES, DTYPES, edge_inputs
    ops = torch.ops.rankdetr
    results = {}
    for dtype_name, channels in CASES:
        value, shapes, starts, locations, weights, grad_output = edge_inputs(
            DTYPES[dtype_name], channels)
        output = ops.ms_deform_attn_forward(value, shapes, starts, locations, weights)
        grads = ops.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_output, True)
        results[(dtype_name, channels)] = {"output": output, "grads": list(grads)}
    torch.save(results, sys.argv[1])
    """)


def _run(path: Path, scalar: bool) -> dict:
    """{(dtype name, channels): {"output", "grads"}} of one copy, in its own process (the copy is
    chosen once per process): one process per copy for all CASES."""
    env = dict(os.environ)
    env.pop("RANKDETR_NO_AVX2", None)
    if scalar:
        env["RANKDETR_NO_AVX2"] = "1"
    command = [sys.executable, "-c", _SCRIPT, str(path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(path)


@pytest.fixture(scope="module")
def both_copies(tmp_path_factory) -> dict[str, dict]:
    """The AVX2 ("vector") and baseline ("scalar") copies' results on every case."""
    folder = tmp_path_factory.mktemp("sampling-core")
    return {
        "vector": _run(folder / "avx2.pt", scalar=False),
        "scalar": _run(folder / "baseline.pt", scalar=True),
    }


def _assert_same_corners(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str):
    """The same NaN and exact zeros (the corners picked), and close values."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN at other places"
    assert torch.equal(actual == 0, expected == 0), f"{name}: exact zeros at other places"
    torch.testing.assert_close(
        actual, expected, rtol=tolerance, atol=tolerance, equal_nan=True, msg=name
    )


def test_edge_inputs_cover_the_boundaries():
    # The pools must really hold the boundary cases, or the comparison below proves little.
    value, shapes, starts, locations, weights, _ = edge_inputs(torch.float32, 5)
    x = locations[..., 0, :, 0] * 7 - 0.5  # level 0 is 5 x 7
    assert (x == -1).any() and (x == 6).any() and (x == 7).any()
    assert locations.isnan().any() and locations.isinf().any()
    assert (locations == 0).any() and (locations == 1).any()
    assert (shapes.prod(1) == 1).any()


@needs_both_copies
@pytest.mark.slow
@pytest.mark.parametrize("channels", [5, 32], ids=["generic-D", "D32"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_avx2_copy_picks_the_corners_of_the_baseline_copy(both_copies, dtype_name, channels):
    vector = both_copies["vector"][(dtype_name, channels)]
    scalar = both_copies["scalar"][(dtype_name, channels)]
    tolerance = TOLERANCE[dtype_name]
    _assert_same_corners(vector["output"], scalar["output"], tolerance, "output")
    for name, got, want in zip(("value", "locations", "weights"), vector["grads"], scalar["grads"]):
        _assert_same_corners(got, want, tolerance, f"grad of {name}")
    # The edge cases are there: NaN rows, finite ones, rows and location gradients exactly zero.
    output, location_grad = scalar["output"], scalar["grads"][1]
    assert output.isnan().any() and output.isfinite().float().mean() > 0.3
    assert (output[:, -1] == 0).all() and (location_grad == 0).any()
