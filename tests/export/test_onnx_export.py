"""ONNX export (rankdetr/export/onnx.py, tools/export_onnx.py): the exported demo models give
the PyTorch model's detections in ONNX Runtime at several input sizes and batch sizes, from one
export, with standard ONNX ops only and the predictor's metadata inside the file.

Each export takes ~30-40 s on 2 cores (tracing, decompositions and the onnxscript optimizer,
whatever the depth), so each config is exported once, and the ONNX tests hold three exports (the
demo, Rank-DINO, the release-tiny model) to stay under 3 minutes of CI. The rank components'
off branches (DINO, H-DETR) are the same graphs minus the rank head and the query sort; they are
checked with the tool at R50 size (`--check` tables in the README).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rankdetr.errors import is_user_error  # noqa: E402
from rankdetr.export import onnx as onnx_export  # noqa: E402
from rankdetr.layers.ms_deform_attn_op import ms_deform_attn_reference  # noqa: E402
from rankdetr.modeling.encoder import encoder_reference_points  # noqa: E402
from rankdetr.modeling.two_stage import grid_proposals  # noqa: E402
from tests.export.conftest import OVERRIDES  # noqa: E402
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
RANK_DINO = ROOT / "configs" / "demo" / "rank_dino_r18_shapes.py"
# One encoder and two decoder layers (the query rank layer sits between decoder layers): the
# same code paths as the demo at two thirds of its export time.
SHALLOW = ["model.encoder_layers=1", "model.decoder_layers=2"]


def build(config: Path, seed: int = 0, overrides=()):
    """(cfg, eval model) as tools/export_onnx.py builds them, with the initial weights."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from export_onnx import build_for_export
    finally:
        sys.path.pop(0)
    torch.manual_seed(seed)
    return build_for_export(str(config), OVERRIDES + list(overrides))


@pytest.fixture(scope="module")
def demo_export(demo_onnx_export):
    """(model, path) of the demo Rank-DETR, exported once per session (conftest.py) from the
    same seed-0 weights that `build` gives."""
    _, model = build(DEMO)
    return model, demo_onnx_export[0]


@pytest.mark.slow(seconds=40)
def test_demo_check_passes_at_the_three_sizes(demo_export):
    model, path = demo_export
    rows = onnx_export.check_onnx(model, path, threads=2)
    assert [row["size"] for row in rows] == ["320x320", "288x416", "512x384"]
    for row in rows:
        assert row["ok"], row
        assert row["compared"] > 0  # the label rule did compare detections


def test_one_export_follows_the_input_size(demo_export):
    """Sizes and a batch the export never saw give the PyTorch detections, not those of the
    traced size: a baked-in level size would move every box and score. 64 px, the contract's
    smallest edge, leaves the stride-64 level one pixel high: the exporter traces sizes as if
    none were 1 (`backed_size_oblivious`), so a broadcast decided for >= 2 would show there."""
    model, path = demo_export
    session = onnx_export.onnx_session(path, threads=2)
    generator = torch.Generator().manual_seed(1)
    for n, h, w in [(1, 256, 448), (3, 384, 320), (1, 64, 1024), (2, 640, 64)]:
        images = torch.rand(n, 3, h, w, generator=generator) * 255
        boxes, scores, labels = session.run(None, {"image": images.numpy()})
        assert boxes.shape == (n, model.num_detections, 4) and labels.dtype.name == "int64"
        expected = onnx_export.pytorch_detections(model, images)
        diff = onnx_export.compare_detections(expected, (boxes, scores, labels))
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 0.01, diff
        assert diff["label_mismatches"] == 0, diff
        assert (boxes[..., 2] <= w).all() and (boxes[..., 3] <= h).all()


def test_graph_has_only_standard_onnx_ops(demo_export):
    import onnx

    _, path = demo_export
    assert onnx_export.custom_domain_ops(path) == []
    op_types = [node.op_type for node in onnx.load(str(path)).graph.node]
    # The deformable attention, one per level: 4 levels in 2 encoder and 3 decoder layers.
    assert op_types.count("GridSample") == 4 * (2 + 3)


def test_opaque_sampling_op_is_grid_sample_with_the_right_shapes():
    """The export's one-op bilinear sampling (its shape known to the tracer without
    grid_sample's decomposition) gives F.grid_sample's numbers, and its fake kernel the real
    shapes (torch.library.opcheck, also under symbolic shapes)."""
    g = torch.Generator().manual_seed(0)
    value = torch.randn(6, 4, 5, 7, generator=g)
    grid = torch.rand(6, 11, 3, 2, generator=g) * 2.4 - 1.2  # some points outside the map
    expected = torch.nn.functional.grid_sample(
        value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    assert torch.equal(onnx_export.opaque_bilinear_samples(value, grid), expected)
    torch.library.opcheck(onnx_export.opaque_bilinear_samples, (value, grid))


def test_graph_is_folded_and_cleaned_up(demo_export):
    """fold_constants_and_clean_up ran: the traced graph's 4021 nodes (shape arithmetic of
    constants, unused nodes) are down to ~1350, with no Constant node left (all lifted to
    initializers) and every initializer used."""
    import onnx

    _, path = demo_export
    graph = onnx.load(str(path)).graph
    assert len(graph.node) < 1500, len(graph.node)
    assert not [node for node in graph.node if node.op_type == "Constant"]
    used = {name for node in graph.node for name in node.input}
    assert {init.name for init in graph.initializer} <= used


def test_metadata_holds_the_test_transform_and_class_names(demo_export):
    _, path = demo_export
    metadata = onnx_export.read_metadata(path)
    assert json.loads(metadata["class_names"]) == ["circle", "square", "triangle", "cross", "ring"]
    (resize,) = json.loads(metadata["test_augmentation"])
    assert resize["_target_"].endswith("ResizeShortestEdge") and resize["short_edge_length"] == 160
    assert metadata["image_format"] == "RGB" and metadata["num_detections"] == "50"


@pytest.mark.slow
def test_rank_dino_exports_and_checks(tmp_path):
    """Rank-DINO's decoder with all four components (the query rank layer runs between its two
    decoder layers), at a third of the demo depth's export time."""
    _, model = build(RANK_DINO, overrides=SHALLOW)
    assert model.rank.flags == "RCH+QRL+GCL+HMC"
    path = tmp_path / "rank_dino.onnx"
    onnx_export.export_onnx(model, path)
    assert onnx_export.custom_domain_ops(path) == []
    rows = onnx_export.check_onnx(model, path, sizes=[(288, 416)], batch_sizes=[2], threads=2)
    assert rows[0]["ok"], rows


def test_export_code_paths_restore_the_model():
    """Outside the context the model runs its usual code (instance attribute removed)."""
    _, model = build(DEMO)
    with onnx_export.export_code_paths(model):
        assert "flatten_levels" in model.__dict__
    assert "flatten_levels" not in model.__dict__
    assert onnx_export.two_stage.grid_proposals is grid_proposals


def test_level_shapes_arguments_give_identical_results():
    """The core functions' `level_shapes` path is the same arithmetic as the host read."""
    shapes = [(6, 5), (3, 3), (2, 1)]
    spatial = torch.tensor(shapes)
    sizes = spatial.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, int(sizes.sum()), 2, 4, generator=g)
    locations = torch.rand(2, 7, 2, 3, 4, 2, generator=g)
    weights = torch.rand(2, 7, 2, 3, 4, generator=g)
    ratios = torch.rand(2, 3, 2, generator=g) * 0.5 + 0.5
    mask = torch.rand(2, int(sizes.sum()), generator=g) > 0.8
    args = (value, spatial, starts, locations, weights)
    assert torch.equal(ms_deform_attn_reference(*args), ms_deform_attn_reference(*args, shapes))
    assert torch.equal(
        encoder_reference_points(spatial, ratios), encoder_reference_points(spatial, ratios, shapes)
    )
    for a, b in zip(
        grid_proposals(mask, spatial), grid_proposals(mask, spatial, level_shapes=shapes)
    ):
        assert torch.equal(a, b)


def test_missing_package_is_named(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_onnxscript(name, *args):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxscript)
    with pytest.raises(onnx_export.OnnxDependencyError, match="'onnxscript'.*\\[onnx\\]"):
        onnx_export.require_onnx_packages()


def test_a_wrong_input_shape_is_refused_before_exporting(tmp_path):
    _, model = build(DEMO)
    for shape in [(2, 320), (0, 320, 320), (1, 32, 320)]:
        with pytest.raises(onnx_export.InputShapeError, match="input_shape") as refused:
            onnx_export.export_onnx(model, tmp_path / "unused.onnx", input_shape=shape)
        assert is_user_error(refused.value)  # the tool prints it as one line
    assert not (tmp_path / "unused.onnx").exists()


def test_the_tool_asks_for_a_fixed_shape_only_with_input_shape(monkeypatch, tmp_path):
    """--input-shape N H W reaches export_onnx as input_shape (the fixed-shape export itself:
    test_onnx_release_tiny.py); without it the export stays dynamic."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_onnx as tool
    finally:
        sys.path.pop(0)
    asked = []

    def record(model, path, **kwargs):
        asked.append(kwargs["input_shape"])
        return onnx_export.ExportResult(Path(path), 0.0, 0, 0)

    monkeypatch.setattr(onnx_export, "export_onnx", record)
    common = ["--config-file", str(DEMO), "--output", str(tmp_path / "demo.onnx")]
    for extra in (["--input-shape", "1", "96", "128"], []):
        assert tool.main(tool.parse_args([*common, *extra, *OVERRIDES])) == 0
    assert asked == [[1, 96, 128], None]


def test_tool_help_runs_without_exporting():
    result = run_python([sys.executable, str(ROOT / "tools" / "export_onnx.py"), "--help"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "--check" in result.stdout


def test_equally_good_orders_are_ties_and_nothing_else():
    """--check's tie rule: another order is taken only where the scores it swaps are within
    the tolerance (a real inversion, a repeated index or a better unchosen score is refused)."""
    good = onnx_export.is_equally_good_order
    scores = torch.tensor([[3.0, 2.0, 2.00005, 1.0]])
    sort = [[0, 2, 1, 3], [0, 1, 2, 3], [1, 0, 2, 3], [0, 0, 2, 3]]
    assert [good(scores, torch.tensor([o]), 1e-4) for o in sort] == [True, True, False, False]
    assert not good(scores, torch.tensor([[0, 1, 2, 3]]), 1e-5)  # the tie is 5e-5 wide
    top_2 = [[0, 2], [0, 1], [0, 3], [2, 0]]  # best first: [2, 0] is an inversion
    assert [good(scores, torch.tensor([o]), 1e-4) for o in top_2] == [True, True, False, False]
    masked = torch.tensor([[-torch.inf, -torch.inf, 1.0]])  # padded positions: exact order
    assert good(masked, torch.tensor([[2, 0, 1]]), 1e-4)
    assert not good(masked, torch.tensor([[0, 2, 1]]), 1e-4)


def test_check_replays_onnx_runtime_orders_only_where_they_tie(demo_export):
    """PyTorch follows ONNX Runtime's TopK orders call by call (selection, then the query rank
    layer's sort): a swapped order reaches the decoder when taken, and is refused where the
    swapped scores are not tied."""
    import numpy as np

    model, path = demo_export
    session, names = onnx_export.session_with_order_outputs(path, threads=2)
    images = torch.rand(1, 3, 288, 416, generator=torch.Generator().manual_seed(3)) * 255
    outputs = session.run(onnx_export.OUTPUT_NAMES + names, {"image": images.numpy()})
    orders = outputs[3:]
    plain = onnx_export.pytorch_detections(model, images)
    same, replay = onnx_export.pytorch_detections(model, images, orders=orders)
    # every sort of the model met its graph counterpart (the last TopK is the final top-k)
    assert (replay.calls, replay.replayed, replay.refused) == (len(orders) - 1, 0, 0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))

    swapped = [o.copy() for o in orders]
    swapped[1][:, [0, 1]] = swapped[1][:, [1, 0]]  # the first rank sort's two best queries
    taken, replay = onnx_export.pytorch_detections(model, images, swapped, tolerance=np.inf)
    # taken; the next sort then follows its (now different) graph order as well
    assert replay.replayed >= 1 and replay.refused == 0
    assert np.abs(taken[1] - plain[1]).max() > 1e-4  # new ranks moved scores past the limit
    kept, replay = onnx_export.pytorch_detections(model, images, swapped, tolerance=0.0)
    assert replay.refused == 1
    assert all(np.array_equal(a, b) for a, b in zip(plain, kept))
