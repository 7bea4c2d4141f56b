"""One run per output folder: a second run refuses naming the other process; the lock ends with
its process however it ends; checkpoint clean-up leaves other live processes' temp files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rankdetr.data import register_shapes_dataset
from rankdetr.engine.checkpoint import TEMP_MARKER, SafeCheckpointer
from rankdetr.engine.run_lock import OWNER_NAME, OutputDirInUseError, run_lock
from rankdetr.engine.runner import do_train, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")
HOLD = """
import sys, time
from rankdetr.engine.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_holder_is_refused_and_the_lock_ends_with_its_holder(tmp_path):
    busy = pytest.raises(OutputDirInUseError, match=f"{tmp_path} is in use .*pid {os.getpid()}")
    with run_lock(tmp_path), busy, run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released when the first run ended
        pass


def test_a_killed_run_does_not_block(tmp_path):
    process = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(OutputDirInUseError, match=f"pid {process.pid}"), run_lock(tmp_path):
            pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with run_lock(tmp_path):  # the killed holder's lock went with it
        pass


def test_the_refusal_names_the_live_holder_not_a_killed_one(tmp_path):
    """A killed run leaves its owner file; the next holder's details replace them, and a run that
    ends normally leaves no owner file."""
    killed = hold_in_another_process(tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (tmp_path / OWNER_NAME).is_file()
    live = hold_in_another_process(tmp_path)
    try:
        busy = pytest.raises(OutputDirInUseError, match=f"pid {live.pid} on ")
        with busy as refused, run_lock(tmp_path):
            pass
        assert f"pid {killed.pid} " not in str(refused.value)
    finally:
        live.kill()
        live.wait()
    with run_lock(tmp_path):
        pass
    assert not (tmp_path / OWNER_NAME).exists()


def test_do_train_refuses_a_busy_output_folder(tmp_path, isolated_catalogs):
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})
    out = tmp_path / "out"
    process = hold_in_another_process(out)
    try:
        cfg = load_config(DEMO, [f"train.output_dir={out}", "train.max_iter=2"])
        with pytest.raises(OutputDirInUseError, match=f"{out} is in use .*pid {process.pid}"):
            do_train(cfg)
    finally:
        process.kill()
        process.wait()
    assert not list(out.glob("model_*.pth"))  # nothing was written


def test_cleanup_leaves_the_temp_files_of_live_processes(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_temp = tmp_path / f".model_0000001.pth{TEMP_MARKER}{sleeper.pid}"
        dead_temp = tmp_path / f".model_0000001.pth{TEMP_MARKER}{dead.pid}"
        for temp in (live_temp, dead_temp):
            temp.write_bytes(b"partial")
        import torch

        SafeCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000002")
        assert live_temp.exists() and not dead_temp.exists()
        assert (tmp_path / "model_0000002.pth").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
