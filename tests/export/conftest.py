"""One export of the demo Rank-DETR per test session, shared by the ONNX tests that need a file
(an export takes ~30 s on 2 cores)."""

import pytest
import torch

from tests.conftest import REPO_ROOT, load_tool

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
OVERRIDES = ["model.num_classes=5"]


@pytest.fixture(scope="session")
def demo_onnx_export(tmp_path_factory):
    """(onnx path, pth path): the demo config (5 classes, the initial weights of seed 0, as
    tools/export_onnx.py and tools/benchmark_inference.py build it) exported with the config's
    metadata, and its weights as a checkpoint for the PyTorch side of a comparison."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rankdetr.export import onnx as onnx_export

    export_tool = load_tool(REPO_ROOT / "tools" / "export_onnx.py", "export_onnx_tool")
    torch.manual_seed(0)
    cfg, model = export_tool.build_for_export(str(DEMO), OVERRIDES)
    folder = tmp_path_factory.mktemp("onnx-session")
    onnx_path, pth_path = folder / "demo.onnx", folder / "demo.pth"
    onnx_export.export_onnx(model, onnx_path, metadata=onnx_export.config_metadata(cfg, str(DEMO)))
    torch.save({"model": model.state_dict(), "iteration": 0}, pth_path)
    return onnx_path, pth_path
