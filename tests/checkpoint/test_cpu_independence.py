"""The float64 fixture comparisons hold whichever code path MKL takes, i.e. on any CPU.

MKL chooses its vector-math and BLAS kernels per CPU (AVX-512 on this Intel, AVX2 on an AMD
EPYC, ...), and their float32 results differ in the last bit. A float64 run that still has a
float32 table inside agrees with the reference on the CPU that made it only. Here the two fixture
test files run again in subprocesses that force other code paths, at the same 1e-10:

* `MKL_ENABLE_INSTRUCTIONS=AVX2` and `=SSE4_2`: the paths of older or other vendors' CPUs
  (a cap: on a CPU without AVX-512 the first is the default path);
* `MKL_CBWR=COMPATIBLE`: MKL's cross-CPU reproducible mode.

On a CPU where PyTorch does not use MKL (ARM) the variables change nothing and the runs repeat
the default one.
"""

import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(MKL_PATHS))
def test_the_float64_fixtures_agree_on_another_mkl_code_path(path, repo_root):
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
