"""No entry point runs code from a weights file.

A pickle can name any callable to call on load. Each file here, a `.pkl` (plain pickle, as
detectron2 model-zoo files are) and a `.pth` (torch.save), holds an object whose unpickling would
create a marker file. Every entry point that reads weights must refuse it, naming the file, and
the marker must never appear: train_net's init_checkpoint, --eval-only and --resume, the
Predictor, the analysis and figure commands, convert_checkpoint.py and backbone weights.
"""

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from rankdetr.checkpoint.backbone_weights import CheckpointError, load_backbone_weights
from rankdetr.data import register_shapes_dataset
from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.engine.runner import build_model, do_train, load_config
from rankdetr.modeling.backbone import ResNetBackbone
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
SMALL = [
    "model.num_queries=10",
    "model.num_queries_one2many=20",
    "model.num_detections=10",
    "train.max_iter=2",
    "train.eval_period=0",
    "dataloader.evaluator=None",  # no evaluation: not what this checks
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
]


class RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears if the loader ran it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=[".pkl", ".pth"])
def evil(request, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"weights{request.param}"
    payload = {"model": {"backbone.stem.conv1.weight": RunsCode(marker)}}
    if request.param == ".pkl":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    yield path, marker
    assert not marker.exists(), f"loading {path.name} ran code from it"


def test_init_checkpoint(evil, tmp_path, isolated_catalogs):
    path, _ = evil
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})
    cfg = load_config(str(DEMO), SMALL + [f"train.init_checkpoint={path}",
                                           f"train.output_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(CheckpointError, match=path.name):
        do_train(cfg)


def test_resume(evil, tmp_path, isolated_catalogs):
    path, _ = evil
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})
    out = tmp_path / "out"
    out.mkdir()
    planted = out / ("model_0000001" + path.suffix)
    planted.write_bytes(path.read_bytes())
    if path.suffix == ".pth":  # a complete zip: resume takes it
        (out / "last_checkpoint").write_text(planted.name)
        cfg = load_config(str(DEMO), SMALL + [f"train.output_dir={out}"])
        with pytest.raises(CheckpointError, match=planted.name):
            do_train(cfg, resume=True)
    else:  # only model_*.pth files are resumed from: the .pkl is never read
        cfg = load_config(str(DEMO), SMALL + [f"train.output_dir={out}"])
        do_train(cfg, resume=True)


def test_eval_only_checkpointer(evil):
    path, _ = evil
    model = build_model(load_config(str(DEMO), SMALL))
    with pytest.raises(CheckpointError, match=path.name):
        SafeCheckpointer(model).load(str(path), strict=True)


def test_predictor(evil):
    from rankdetr import Predictor

    path, _ = evil
    with pytest.raises(CheckpointError, match=path.name):
        Predictor(str(DEMO), str(path))


def test_backbone_weights(evil):
    path, _ = evil
    with pytest.raises(CheckpointError, match=path.name):
        load_backbone_weights(ResNetBackbone(depth=18), path)


@pytest.mark.parametrize("tool", ["convert_checkpoint", "plot_pr_curves"])
def test_command_line_tools(evil, tool, tmp_path):
    path, _ = evil
    if tool == "convert_checkpoint":
        command = [str(path), str(tmp_path / "converted.pth")]
    else:
        command = ["--model", "A", str(DEMO), str(path), "--output", str(tmp_path / "pr.png")]
        command += ["--max-images", "1", "model.num_queries=10", "model.num_queries_one2many=0"]
    result = run_python(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg"},
        timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert path.name in result.stderr
    assert not (tmp_path / "converted.pth").exists() and not (tmp_path / "pr.png").exists()
