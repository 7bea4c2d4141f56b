"""Evaluation and resume load strictly; fine-tuning onto another number of classes is an explicit
head surgery; train_net reports these errors in one line."""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from rankdetr.checkpoint.backbone_weights import CheckpointError
from rankdetr.data import register_shapes_dataset
from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.engine.runner import build_model, do_train, load_config
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")
R50 = str(ROOT / "configs" / "rank_detr" / "rank_detr_r50_12ep.py")
SMALL = ["model.num_queries=10", "model.num_queries_one2many=20", "model.num_detections=10"]


def demo_model(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config(DEMO, SMALL + [f"model.num_classes={num_classes}"]))


@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "five.pth"
    torch.save({"model": demo_model(5).state_dict()}, path)
    return path


def test_strict_load_names_shape_mismatches(five_class_checkpoint):
    model = demo_model(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"with other shapes \(e\.g\. .*class_head"):
        SafeCheckpointer(model).load(str(five_class_checkpoint), strict=True)
    for name, tensor in model.state_dict().items():  # refused before anything was loaded
        assert torch.equal(tensor, before[name]), name


def test_strict_load_names_missing_and_unexpected_tensors(five_class_checkpoint):
    torch.manual_seed(0)
    r50 = build_model(load_config(R50, ["model.num_classes=5"]))
    with pytest.raises(CheckpointError, match="missing .* unexpected .*five.pth|five.pth.*missing"):
        SafeCheckpointer(r50).load(str(five_class_checkpoint), strict=True)


def test_fine_tuning_onto_other_classes_reinitialises_only_the_class_tensors(
    five_class_checkpoint, caplog
):
    model = demo_model(3, seed=1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = torch.load(five_class_checkpoint, weights_only=True)["model"]
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(model).load(str(five_class_checkpoint), checkpointables=[])
    reinitialised = set()
    for name, tensor in model.state_dict().items():
        if source[name].shape == tensor.shape:
            assert torch.equal(tensor, source[name]), name
        else:
            assert torch.equal(tensor, fresh[name]), name
            reinitialised.add(name)
    assert reinitialised and all(
        n.startswith(("decoder.class_heads.", "proposals.class_head.", "decoder.rank_class_bias."))
        for n in reinitialised
    )
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "another number of classes" in message and "proposals.class_head.weight" in message


def test_fine_tuning_a_rank_dino_onto_other_classes(tmp_path, caplog):
    """DINO's denoising label embeddings have a row per class: re-initialised with the heads."""
    dino = str(ROOT / "configs" / "demo" / "rank_dino_r18_shapes.py")
    small = ["model.num_queries=10", "model.num_detections=10"]
    torch.manual_seed(0)
    five = build_model(load_config(dino, small + ["model.num_classes=5"]))
    torch.save({"model": five.state_dict()}, tmp_path / "dino5.pth")
    torch.manual_seed(1)
    three = build_model(load_config(dino, small + ["model.num_classes=3"]))
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(three).load(str(tmp_path / "dino5.pth"), checkpointables=[])
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "label_embedding.weight" in message and "decoder.rank_class_bias.0.weight" in message
    assert torch.equal(three.level_embeds, five.level_embeds)


def test_a_full_checkpoint_of_another_architecture_is_refused_at_init(five_class_checkpoint):
    torch.manual_seed(0)
    wider = build_model(load_config(DEMO, SMALL + ["model.num_classes=5", "model.ffn_dim=256"]))
    with pytest.raises(CheckpointError, match="linear1.weight"):
        SafeCheckpointer(wider).load(str(five_class_checkpoint), checkpointables=[])


def test_resume_is_strict(tmp_path, isolated_catalogs):
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})
    common = SMALL + ["train.max_iter=2", "train.eval_period=0", f"train.output_dir={tmp_path}"]
    common += ["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0"]
    do_train(load_config(DEMO, common))
    with pytest.raises(CheckpointError, match="model_final.pth.*other shapes"):
        do_train(load_config(DEMO, common + ["model.ffn_dim=256", "train.max_iter=4"]), resume=True)


def test_train_net_reports_a_bad_checkpoint_in_one_line(five_class_checkpoint, tmp_path):
    command = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", DEMO,
               "--eval-only", f"train.init_checkpoint={five_class_checkpoint}",
               "model.num_classes=3", f"train.output_dir={tmp_path}", *SMALL]  # fmt: skip
    result = run_python(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "five.pth" in lines[0] and "Traceback" not in result.stderr
    env = {**os.environ, "RANKDETR_TRACEBACK": "1"}
    result = run_python(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "CheckpointError" in result.stderr
