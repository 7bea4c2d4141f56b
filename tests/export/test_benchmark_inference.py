"""tools/benchmark_inference.py: one table, eager and ONNX Runtime rows, from an exported file."""

import pytest

from tests.conftest import REPO_ROOT, load_tool
from tests.export.conftest import OVERRIDES

pytest.importorskip("onnxruntime")


def test_prints_eager_and_onnxruntime_rows_with_their_ratio(demo_onnx_export, capsys):
    tool = load_tool(REPO_ROOT / "tools" / "benchmark_inference.py", "benchmark_inference")
    config, _, size = tool.MODELS["demo"]
    tool.MODELS["demo"] = (config, OVERRIDES, size)  # the network of the shared export
    options = ["--models", "demo", "--repeats", "1", "--threads", "1", "--image-size", "96", "128"]
    args = tool.parse_args([*options, "--onnx", f"demo={demo_onnx_export[0]}"])
    tool.main(args)
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("| demo")]
    assert len(table) == 2, lines
    eager, ort = ([cell.strip() for cell in row.strip("|").split("|")] for row in table)
    assert eager[:3] == ["demo", "96x128", "eager"] and eager[6] == "1.00"
    assert ort[:3] == ["demo", "96x128", "onnxruntime"]
    median_eager, median_ort = float(eager[3]), float(ort[3])
    assert float(ort[6]) == pytest.approx(median_eager / median_ort, rel=0.02)
    # Same weights, same image: the scores agree (the export's check is 1e-4).
    assert float(ort[7]) < 1e-4
