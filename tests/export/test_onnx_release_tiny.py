"""ONNX export of the release-tiny-sized model with the original release's weights.

`../shared/reference/release-tiny/` holds a state dict of the original Rank-DETR release (RCH,
QRL, GCL and HMC on; the parameters the release initialises to zero hold random values, as after
training) and the release's own float64 detections on two 128x160 images. The state dict goes
through our converter into our model, strictly; the exported file then
- passes `--check` beside PyTorch at the three check sizes, and
- gives the release's own detections on the fixture's images in ONNX Runtime (float32 against
  the release's float64: the check's tolerances, labels compared where the scores are separated).
"""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rankdetr.checkpoint import convert_release_state_dict  # noqa: E402
from rankdetr.export import onnx as onnx_export  # noqa: E402
from tests.checkpoint.test_release_fixture import build_model  # noqa: E402
from tests.shared_reference import load_shared_reference  # noqa: E402


@pytest.fixture(scope="module")
def fixture():
    return load_shared_reference("release-tiny/release_tiny_fixture.pth")


@pytest.fixture(scope="module")
def exported(fixture, tmp_path_factory):
    """(float32 eval model with the release's weights, its .onnx file)."""
    model = build_model(fixture["config"])
    model.load_state_dict(convert_release_state_dict(fixture["state_dict"]), strict=True)
    model.eval()
    assert model.rank.flags == "RCH+QRL+GCL+HMC"
    path = tmp_path_factory.mktemp("onnx-release-tiny") / "release_tiny.onnx"
    onnx_export.export_onnx(model, path)
    return model, path


@pytest.mark.slow(seconds=45)
def test_release_weights_export_and_pass_the_check(exported):
    model, path = exported
    assert onnx_export.custom_domain_ops(path) == []
    rows = onnx_export.check_onnx(model, path, threads=2)
    assert [row["size"] for row in rows] == ["320x320", "288x416", "512x384"]
    for row in rows:
        assert row["ok"], row
        assert row["compared"] > 0


def test_onnx_runtime_gives_the_release_detections(fixture, exported):
    _, path = exported
    images = torch.stack([sample["image"] for sample in fixture["inputs"]]).float()
    session = onnx_export.onnx_session(path, threads=2)
    boxes, scores, labels = session.run(onnx_export.OUTPUT_NAMES, {"image": images.numpy()})
    reference = fixture["eval"]["detections"]
    expected = (
        np.stack([r["boxes"].numpy() for r in reference]),
        np.stack([r["scores"].numpy() for r in reference]),
        np.stack([r["classes"].numpy() for r in reference]),
    )
    assert scores.shape == expected[1].shape == (2, 60)
    difference = onnx_export.compare_detections(expected, (boxes, scores, labels))
    assert difference["scores"] <= onnx_export.TOLERANCES["scores"], difference
    assert difference["boxes"] <= onnx_export.TOLERANCES["boxes"], difference
    assert difference["label_mismatches"] == 0, difference
    assert difference["compared"] >= 60, difference  # most of the 120 are separated
