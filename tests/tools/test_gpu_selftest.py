"""tools/gpu_selftest.py on a CPU-only machine: the CPU checks run and pass, the GPU ones are
listed as skipped, and a wrong op makes the command fail."""

import pytest
import torch

import rankdetr.selftest as selftest
from tests.conftest import REPO_ROOT, load_tool

TOOL = REPO_ROOT / "tools" / "gpu_selftest.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool(TOOL, "gpu_selftest")


def test_cpu_run_passes_and_lists_what_it_skipped(tool, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only report")
    assert tool.main(["--quick"]) == 0
    out = capsys.readouterr().out
    statuses = {tuple(cells[:2]): cells[2] for cells in table_rows(out)}
    assert statuses["op on cpu", "several levels, float64"] == "ok"
    assert statuses["op on cpu", "gradcheck, float64"] == "ok"
    assert statuses["ddp", "NCCL over all GPUs"] == "skipped"
    assert "skipped" in {status for (_, check), status in statuses.items() if "R50" in check}
    assert "0 failed" in out


def table_rows(out: str) -> list[list[str]]:
    """The cells of each row of the markdown table in `out` (header and rule left out)."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_a_wrong_op_is_a_failure_and_a_non_zero_exit(tool, monkeypatch, capsys):
    def off_by_a_percent(*args):
        return selftest.ms_deform_attn_reference(*args) * 1.01

    monkeypatch.setattr(selftest, "ms_deform_attn", off_by_a_percent)
    rows = selftest.op_correctness("cpu")
    assert rows and all(row.status == "FAIL" for row in rows)
    monkeypatch.setattr(selftest, "op_speed", lambda device, repeats: [])
    monkeypatch.setattr(selftest, "model_run", lambda *args: [])
    assert tool.main(["--quick", "--device", "cpu"]) == 1
    assert "failed" in capsys.readouterr().out
