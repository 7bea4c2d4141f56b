"""tools/train_net.py as users run it: bad overrides, and a two-process CPU (GLOO) run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


def run_train_net(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, str(TRAIN_NET), "--config-file", str(DEMO), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_wrong_override_key_fails_with_its_name(tmp_path):
    result = run_train_net(f"train.output_dir={tmp_path}", "train.max_itr=5")
    assert result.returncode == 1
    assert "train.max_itr" in result.stderr and "train.max_iter" in result.stderr


@pytest.mark.slow
def test_two_cpu_processes_train_a_few_iterations(tmp_path):
    result = run_train_net(
        "--num-gpus",
        "2",
        "train.device=cpu",
        "train.max_iter=3",
        "train.eval_period=0",
        "train.log_period=1",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        f"train.output_dir={tmp_path / 'out'}",
        env={"GLOO_SOCKET_IFNAME": "lo"},  # the bundled data in datasets/ is shared across runs
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "iter: 2" in result.stdout + result.stderr


def test_the_demo_trains_under_bf16_autocast(tmp_path):
    """The command that crashed before the op had an autocast contract (issue: AMP on real
    models): two iterations of the demo config with train.amp=bf16 on the CPU."""
    result = run_train_net(
        "train.amp=bf16",
        "train.max_iter=2",
        "train.eval_period=0",
        "train.log_period=1",
        "dataloader.train.num_workers=0",
        f"train.output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "iter: 1" in result.stdout + result.stderr
