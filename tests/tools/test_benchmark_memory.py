"""tools/benchmark_memory.py runs both variants in their own processes and prints one table.

Measured on the demo model (`--config-file`): the tool's code is the same for every config, and the
R50 default cost ~6 s more per process (its 1800 queries and 40 M parameters)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


@pytest.mark.slow(seconds=14)
def test_prints_peak_rss_and_time_of_both_variants():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmark_memory.py"),
         "--config-file", str(DEMO), "--image-size", "64", "96", "--batch", "1"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank_detr_r18_shapes.py, training step, batch 1 of 64x96" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| on", "| off"))]
    assert len(rows) == 2
    off = rows[0].split("|")
    assert off[1].strip() == "off" and off[4].strip() == "1.00x" and float(off[2]) > 0.1
