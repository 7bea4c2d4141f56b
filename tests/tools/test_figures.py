"""The figure commands (tools/plot_*.py, tools/visualize_layer_boxes.py) end to end on a tiny
random model and a 2-image dataset, and their errors for bad inputs."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from rankdetr.analysis.loading import run_command
from rankdetr.data.synthetic import generate_shapes_dataset
from rankdetr.engine.runner import build_model, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
TOOLS = ["plot_pr_curves", "plot_score_distributions", "plot_max_iou_cdf", "visualize_layer_boxes"]
# The demo model made tiny: the commands then spend their time importing, not computing.
TINY = [
    "model.embed_dim=32",
    "model.num_heads=4",
    "model.ffn_dim=64",
    "model.encoder_layers=1",
    "model.decoder_layers=2",
    "model.num_queries=10",
    "model.num_queries_one2many=0",
    "model.num_detections=20",
    "model.neck.out_channels=32",
    "model.neck.norm_groups=8",
    "train.device=cpu",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny checkpoints (different random weights) and a 2-image COCO-format dataset."""
    root = tmp_path_factory.mktemp("figures")
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(load_config(str(DEMO), TINY))
        checkpoints.append(root / f"model_{seed}.pth")
        torch.save({"model": model.state_dict()}, checkpoints[-1])
    json_file = generate_shapes_dataset(root / "data", "val", 2, seed=2)
    return {"root": root, "checkpoints": checkpoints, "json": json_file}


def _data_args(tiny) -> list[str]:
    json_file = tiny["json"]
    return ["--coco-json", str(json_file), "--image-root", str(json_file.parent / "images")]


def _model_args(tiny, count: int = 2) -> list[str]:
    args = []
    for name, checkpoint in zip(["A", "B"], tiny["checkpoints"][:count]):
        args += ["--model", name, str(DEMO), str(checkpoint)]
    return args


def test_every_command_writes_a_png_for_two_models(tiny, capsys, monkeypatch):
    """All four commands with a user's arguments, through the entry point their scripts call
    (run_command(main)), in this process: a subprocess each would mostly import torch and
    detectron2 again (tests/test_untrusted_files.py runs them as commands)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    outputs = {tool: tiny["root"] / "out" / f"{tool}.png" for tool in TOOLS}
    logs = {}
    for tool in TOOLS:
        argv = [*_model_args(tiny), *_data_args(tiny), "--output", str(outputs[tool]), *TINY]
        run_command(_tool(tool).main, argv)
        captured = capsys.readouterr()
        logs[tool] = captured.out
        data = outputs[tool].read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, tool
        assert "%|" in captured.err, tool  # the tqdm progress bar

    # Every ground-truth box gets one matched query (10 queries >= boxes per image).
    annotations = json.loads(tiny["json"].read_text())["annotations"]
    num_boxes = sum(1 for a in annotations if not a.get("iscrowd", 0))
    for name in ("A", "B"):
        match = re.search(rf"{name}: (\d+) matched queries .* (\d+) unmatched", logs[TOOLS[1]])
        assert match, logs[TOOLS[1]]
        assert int(match.group(1)) == num_boxes and int(match.group(2)) == 2 * 10 - num_boxes
        assert re.search(rf"{name}: AP \d+\.\d on 2 images", logs[TOOLS[0]])
        layers = re.search(rf"{name}: mean max IoU .* per layer: (.*)", logs[TOOLS[2]])
        assert layers and len(layers.group(1).split(",")) == 2


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_of(tool: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(_tool(tool).main, argv)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def test_missing_checkpoint_is_named(tiny, capsys, tmp_path):
    missing = tmp_path / "nope.pth"
    argv = ["--model", "A", str(DEMO), str(missing), *_data_args(tiny),
            "--output", str(tmp_path / "x.png"), *TINY]  # fmt: skip
    error = _error_of("plot_max_iou_cdf", argv, capsys)
    assert "checkpoint file not found" in error and str(missing) in error


def test_config_without_test_mapper_is_named(tiny, capsys, tmp_path):
    config = tmp_path / "model_only.py"
    config.write_text(
        "from detectron2.config import LazyConfig\n"
        f"model = LazyConfig.load({str(DEMO)!r}).model\n"
    )
    argv = ["--model", "A", str(config), str(tiny["checkpoints"][0]), *_data_args(tiny),
            "--output", str(tmp_path / "x.png")]  # fmt: skip
    error = _error_of("plot_score_distributions", argv, capsys)
    assert str(config) in error and "dataloader.test.mapper" in error


def test_checkpoint_of_another_config_is_refused(tiny, capsys, tmp_path):
    argv = [*_model_args(tiny, 1), *_data_args(tiny), "--output", str(tmp_path / "x.png"),
            *[o.replace("embed_dim=32", "embed_dim=64") for o in TINY]]  # fmt: skip
    error = _error_of("visualize_layer_boxes", argv, capsys)
    assert "does not fit the model built from the config" in error and "model_0.pth" in error
    assert "level_embeds: (4, 32) in the checkpoint, (4, 64) in the model" in error


def test_too_many_models_and_bad_indices_are_refused(tiny, capsys, tmp_path):
    three = [*_model_args(tiny), "--model", "C", str(DEMO), str(tiny["checkpoints"][0])]
    argv = [*three, *_data_args(tiny), "--output", str(tmp_path / "x.png"), *TINY]
    assert "at most 2 --model" in _error_of("plot_pr_curves", argv, capsys)
    argv = [*_model_args(tiny, 1), *_data_args(tiny), "--image-indices", "0,7",
            "--output", str(tmp_path / "x.png"), *TINY]  # fmt: skip
    error = _error_of("visualize_layer_boxes", argv, capsys)
    assert "--image-indices [7] out of range" in error and "2 images" in error
