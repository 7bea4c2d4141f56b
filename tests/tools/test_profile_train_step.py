"""tools/profile_train_step.py on the demo config made small: the step it times and profiles is a
whole training step (forward, backward, optimizer) in the precision the config asks for."""

import re

from tests.conftest import REPO_ROOT, load_tool

DEMO = REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
SMALL = ["model.decoder_layers=2", "model.num_queries=10", "model.num_queries_one2many=20",
         "model.num_detections=10", "dataloader.train.total_batch_size=2"]  # fmt: skip


def run(capsys, *overrides: str) -> str:
    tool = load_tool(REPO_ROOT / "tools" / "profile_train_step.py", "profile_train_step")
    argv = ["--config-file", str(DEMO), "--warmup", "1", "--steps", "1", "--profile-steps", "1"]
    assert tool.main([*argv, "--rows", "500", *SMALL, *overrides]) == 0
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
