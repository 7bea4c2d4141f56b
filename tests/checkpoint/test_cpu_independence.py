"""The float64 fixture comparisons hold whichever code path MKL takes, i.e. on any CPU.

MKL chooses its vector-math and BLAS kernels per CPU (AVX-512 on this Intel, AVX2 on an AMD
EPYC, ...), and their float32 results differ in the last bit. A float64 run that still has a
float32 table inside agrees with the reference on the CPU that made it only. Here the two fixture
test files run again in subprocesses that force other code paths, at the same 1e-10:

* `MKL_ENABLE_INSTRUCTIONS=AVX2` and `=SSE4_2`: the paths of older or other vendors' CPUs
  (a cap: on a CPU with nothing above AVX2 the first is the default path, which the main run
  already covers, so it is skipped there);
* `MKL_CBWR=COMPATIBLE`: MKL's cross-CPU reproducible mode.

On a CPU where PyTorch does not use MKL (ARM) the variables change nothing and the runs repeat
the default one.
"""

import os
import subprocess
import sys

import pytest

from rankdetr.engine.precision import _proc_cpuinfo_flags
from tests.shared_reference import SHARED_REFERENCE

FIXTURE_TESTS = [
    "tests/checkpoint/test_release_fixture.py",
    "tests/checkpoint/test_dino_fixture.py",
]
FIXTURES = ["release-tiny/release_tiny_fixture.pth", "dino-tiny/dino_tiny_fixture.pth"]
MKL_PATHS = {
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "sse4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "cbwr_compatible": {"MKL_CBWR": "COMPATIBLE"},
}


def mkl_cap_is_the_default(path: str) -> bool:
    """True where forcing `path` cannot change what MKL runs: an AVX2 cap on a CPU whose flags
    show nothing above AVX2 (no AVX-512, no AVX-VNNI, MKL's AVX2_E1). The main run already ran
    that path; where the flags are unknown (no /proc/cpuinfo) the rerun stays."""
    if path != "avx2":
        return False
    flags = _proc_cpuinfo_flags()
    above_avx2 = any(flag.startswith("avx512") or flag == "avx_vnni" for flag in flags)
    return bool(flags) and "avx2" in flags and not above_avx2


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(MKL_PATHS))
def test_the_float64_fixtures_agree_on_another_mkl_code_path(path, repo_root):
    if mkl_cap_is_the_default(path):
        pytest.skip("MKL_ENABLE_INSTRUCTIONS=AVX2 is this CPU's own path (nothing above AVX2)")
    for fixture in FIXTURES:
        if not (SHARED_REFERENCE / fixture).is_file():
            pytest.skip(f"reference data not found: {SHARED_REFERENCE / fixture}")
    env = {**os.environ, **MKL_PATHS[path]}
    for name in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"):
        if name not in MKL_PATHS[path]:
            env.pop(name, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FIXTURE_TESTS]
    run = subprocess.run(
        command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600
    )
    report = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"with {MKL_PATHS[path]}:\n{report}"
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, report


@pytest.mark.parametrize(
    "flags, path, skipped",
    [
        ({"sse4_2", "avx2", "fma"}, "avx2", True),  # Zen 3: AVX2 is the top
        ({"avx2", "avx512f", "avx512_bf16"}, "avx2", False),  # Zen 4, Xeon: the cap changes it
        ({"avx2", "avx_vnni"}, "avx2", False),  # AVX2_E1 is above the cap
        (set(), "avx2", False),  # flags unknown: keep the rerun
        ({"sse4_2", "avx2"}, "sse4_2", False),  # SSE4.2 is below AVX2: always another path
    ],
)
def test_only_a_cap_at_the_cpus_own_top_is_skipped(monkeypatch, flags, path, skipped):
    monkeypatch.setattr(sys.modules[__name__], "_proc_cpuinfo_flags", lambda: flags)
    assert mkl_cap_is_the_default(path) is skipped
