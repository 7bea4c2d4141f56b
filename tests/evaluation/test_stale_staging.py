"""An evaluation killed while writing its results (a SIGTERM) leaves
`inference/.staging-<pid>/`; the next evaluation removes the folders of processes that are gone
and keeps those of live ones, which may still be writing."""

import subprocess
import sys

import pytest

from rankdetr.data import register_shapes_dataset
from tests.engine.test_lock_first import train_net
from tests.test_predictor import TINY_OVERRIDES


@pytest.fixture
def live_and_dead_pids():
    """The pid of a process that runs until the test ends, and of one that has ended."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        yield live.pid, dead.pid
    finally:
        live.kill()
        live.wait()


def test_eval_only_removes_the_staging_folders_of_dead_processes(
    tmp_path, isolated_catalogs, monkeypatch, live_and_dead_pids
):
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 2, "val": 2})
    inference = tmp_path / "out" / "inference"
    live_pid, dead_pid = live_and_dead_pids
    left = {}
    for pid in (live_pid, dead_pid):
        left[pid] = inference / f".staging-{pid}"
        left[pid].mkdir(parents=True)
        (left[pid] / "coco_instances_results.json").write_text('[{"image_id": 1, "bb')  # cut off
    train_net(monkeypatch, "--eval-only", *TINY_OVERRIDES, "dataloader.test.num_workers=0",
              f"train.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert not left[dead_pid].exists()
    assert (left[live_pid] / "coco_instances_results.json").is_file()
    assert (inference / "coco_instances_results.json").is_file()  # this evaluation's results
    assert sorted(p.name for p in inference.glob(".staging-*")) == [f".staging-{live_pid}"]
