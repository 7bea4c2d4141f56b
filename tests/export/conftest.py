"""One export of the demo Rank-DETR per test session, shared by the ONNX tests that need a file
(an export takes ~30 s on 2 cores), also across pytest-xdist workers."""

import os

import pytest
import torch
from filelock import FileLock

from tests.conftest import REPO_ROOT, load_tool

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
# The demo network with 2 encoder layers, as before the demo moved to 1 (issue 25): the tie
# scenarios of these tests (untrained weights give near-equal scores; which ones tie depends on
# the network) and the README's ONNX figures are this network's seed-0 weights.
OVERRIDES = ["model.num_classes=5", "model.encoder_layers=2"]


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
    # Under xdist every worker has its own base temp folder below a shared one: the first worker
    # to get there exports, the others wait on the lock and take its files.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / "onnx-session"
    onnx_path, pth_path = folder / "demo.onnx", folder / "demo.pth"
    with FileLock(str(shared / "onnx-session.lock")):
        if not pth_path.is_file():
            folder.mkdir(exist_ok=True)
            metadata = onnx_export.config_metadata(cfg, str(DEMO))
            onnx_export.export_onnx(model, onnx_path, metadata=metadata)
            torch.save({"model": model.state_dict(), "iteration": 0}, pth_path)
    return onnx_path, pth_path
