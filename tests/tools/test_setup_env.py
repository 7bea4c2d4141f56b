"""tools/setup_env.sh: a second run finds every step done and reinstalls nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="runs only inside the project's own .venv, which the set-up manages",
)
@pytest.mark.slow
def test_second_setup_run_skips_every_step():
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "setup_env.sh")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "virtual environment:" in out and "(exists)" in out
    assert "(installed)" in out  # torch
    assert "nothing to do" in out  # detectron2
    assert "sources unchanged" in out  # rankdetr and its extension
    for line in out.splitlines():
        assert not line.startswith(("[setup] installing", "[setup] creating")), line
