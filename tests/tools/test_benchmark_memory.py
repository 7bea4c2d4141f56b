"""tools/benchmark_memory.py runs both variants in their own processes and prints one table."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow(seconds=20)
def test_prints_peak_rss_and_time_of_both_variants():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmark_memory.py"),
         "--image-size", "64", "96", "--batch", "1"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| on", "| off"))]
    assert len(rows) == 2
    off = rows[0].split("|")
    assert off[1].strip() == "off" and off[4].strip() == "1.00x" and float(off[2]) > 0.1
