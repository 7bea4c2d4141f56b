"""tools/profile_train_step.py on the demo config made small: the step it times and profiles is a
whole training step (forward, backward, optimizer) in the precision the config asks for."""

import re

import pytest
import torch

from tests.conftest import REPO_ROOT, load_tool

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
SMALL = ["model.decoder_layers=2", "model.num_queries=10", "model.num_queries_one2many=20",
         "model.num_detections=10", "dataloader.train.total_batch_size=2"]  # fmt: skip


def run(capsys, *overrides: str, flags=()) -> str:
    tool = load_tool(REPO_ROOT / "tools" / "profile_train_step.py", "profile_train_step")
    argv = ["--config-file", str(DEMO), "--warmup", "1", "--steps", "1", "--profile-steps", "1"]
    assert tool.main([*argv, "--rows", "500", *flags, *SMALL, *overrides]) == 0
    return capsys.readouterr().out


def test_prints_the_step_time_and_the_operators_of_forward_backward_and_optimizer(capsys):
    out = run(capsys, "train.amp.enabled=False")
    assert "precision: float32" in out
    seconds = float(re.search(r"seconds per step: (\d+\.\d+)", out).group(1))
    assert seconds > 0
    calls = int(re.search(r"ATen calls per step \(nested included\): (\d+)", out).group(1))
    assert calls > 1000
    # The backward and the optimizer ran inside the profiled step.
    assert "aten::convolution_backward" in out and "aten::_fused_adamw_" in out


def test_the_config_precision_is_used(capsys):
    out = run(capsys, "train.amp.enabled=True", "train.amp.dtype=bf16")
    assert "precision: bf16 (train.amp.dtype=bf16 as configured" in out


def test_phases_split_the_step_by_part_without_counting_any_twice(capsys):
    out = run(capsys, "train.amp.enabled=False", flags=["--phases"])
    table = out.split("where a step goes", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"(.+?)\s+(\d+\.\d)\s+(\d+\.\d)%\s+(\d+)$", line)
        rows[match.group(1)] = (float(match.group(2)), float(match.group(3)), int(match.group(4)))
    step = rows.pop("step")
    for part in ("backbone", "encoder", "decoder", "criterion", "backward", "optimizer"):
        assert rows[part][0] > 0 and rows[part][2] > 0, (part, rows)
    # Every moment and every operator belongs to exactly one part: nested parts (the criterion
    # inside the model's forward) are not counted twice.
    assert sum(ms for ms, _, _ in rows.values()) == pytest.approx(step[0], rel=0.01, abs=0.2)
    assert sum(ops for _, _, ops in rows.values()) == step[2]
    assert rows["backward"][2] > rows["criterion"][2] > 100  # losses of every output


def test_phase_recording_leaves_the_model_and_torch_as_they_were():
    tool = load_tool(REPO_ROOT / "tools" / "profile_train_step.py", "profile_train_step")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backward = torch.Tensor.backward
    phases = tool._Phases(model, optimizer)
    with phases.recording(count_operators=True):
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
    assert set(phases.seconds) >= {"0", "1", "backward", "optimizer"}
    assert phases.operators["0"] > 0 and phases.operators["optimizer"] > 0
    assert torch.Tensor.backward is backward and "step" not in optimizer.__dict__
    assert all("forward" not in module.__dict__ for module in (model, *model))
