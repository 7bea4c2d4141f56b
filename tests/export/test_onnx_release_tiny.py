"""ONNX export of the release-tiny-sized model with the original release's weights.

`../shared/reference/release-tiny/` holds a state dict of the original Rank-DETR release (RCH,
QRL, GCL and HMC on; the parameters the release initialises to zero hold random values, as after
training) and the release's own float64 detections on two 128x160 images. The state dict goes
through our converter into our model, strictly, and is exported with a fixed input shape, the
fixture's batch of two 128x160 images (`input_shape`): the file then
- passes `--check` beside PyTorch at that shape,
- gives the release's own detections on the fixture's images in ONNX Runtime (float32 against
  the release's float64: the check's tolerances, labels compared where the scores are separated),
- and refuses any other shape with an error that names its own.

Why a fixed shape here: this file's point is the release's weights; dynamic sizes and batches
run the same RankDETR code paths in the demo export (test_onnx_export.py), and a fixed-shape
export traces no symbolic sizes (about half the time of a dynamic one).
"""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rankdetr.checkpoint import convert_release_state_dict  # noqa: E402
from rankdetr.export import OnnxDetector, OnnxInputError  # noqa: E402
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
    onnx_export.export_onnx(model, path, input_shape=INPUT_SHAPE)
    return model, path


# (N, H, W) of the fixture's inputs: two 128x160 images.
INPUT_SHAPE = (2, 128, 160)


@pytest.mark.slow(seconds=25)
def test_release_weights_export_and_pass_the_check(exported):
    model, path = exported
    assert onnx_export.custom_domain_ops(path) == []
    assert onnx_export.fixed_input_shape(path) == (2, 3, 128, 160)
    assert onnx_export.read_metadata(path)["input_shape"] == "[2, 3, 128, 160]"
    (row,) = onnx_export.check_onnx(model, path, threads=2)  # at the file's own shape
    assert (row["size"], row["batch"]) == ("128x160", 2)
    assert row["ok"], row
    assert row["compared"] > 0


def test_a_fixed_shape_file_refuses_another_shape_naming_its_own(exported):
    model, path = exported
    detector = OnnxDetector(path, threads=1)
    assert detector.fixed_shape == (2, 3, 128, 160)
    one_image = {"image": torch.zeros(3, 128, 160, dtype=torch.uint8)}
    with pytest.raises(OnnxInputError, match=r"one input shape, \(2, 3, 128, 160\).*\(1, 3, 128"):
        detector([one_image])
    with pytest.raises(
        onnx_export.InputShapeError, match=r"takes only \(N, H, W\) = \(2, 128, 160\)"
    ):
        onnx_export.check_onnx(model, path, sizes=[(320, 320)], batch_sizes=[2])


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
