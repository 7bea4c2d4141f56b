"""The output folder's lock comes first: a run refused because another one holds the folder
changes none of its files (detectron2's default_setup would rewrite `config.yaml` and append to
`log.txt`), for training and for --eval-only, whether run 1 is another process or holds the lock
in this one; a run that holds the folder trains through do_train's own lock."""

import os
import re
import runpy
import sys
from pathlib import Path

import pytest

from rankdetr.data import register_shapes_dataset
from rankdetr.engine.run_lock import LOCK_NAME, OWNER_NAME, run_lock
from tests.conftest import REPO_ROOT
from tests.engine.test_run_lock import hold_in_another_process
from tests.test_predictor import DEMO_CONFIG, TINY_OVERRIDES
from tests.warm_python import run_python

# What run 1 wrote: run 2 asks for other values, so a rewrite would show.
RUN_1_FILES = {
    "config.yaml": b"train:\n  max_iter: 5\n  seed: 1\n",
    "log.txt": b"[run 1] iter: 3  total_loss: 4.2\n",
}
RUN_2 = [*TINY_OVERRIDES, "train.max_iter=999", "train.seed=777"]


def train_net(monkeypatch, *args: str) -> None:
    """tools/train_net.py's __main__ block, in this process (a subprocess would import torch
    again)."""
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--config-file", DEMO_CONFIG, *args])
    runpy.run_path(str(REPO_ROOT / "tools" / "train_net.py"), run_name="__main__")


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the lock's own two, with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in (LOCK_NAME, OWNER_NAME)
    }


@pytest.fixture
def run_1_folder(tmp_path, isolated_catalogs) -> Path:
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 2, "val": 2})
    folder = tmp_path / "run_1"
    folder.mkdir()
    for name, content in RUN_1_FILES.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("mode", [[], ["--eval-only"]], ids=["train", "eval-only"])
def test_a_run_refused_by_another_process_writes_nothing(run_1_folder, monkeypatch, capsys, mode):
    run_1 = hold_in_another_process(run_1_folder)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_net(monkeypatch, *mode, *RUN_2, f"train.output_dir={run_1_folder}")
    finally:
        run_1.kill()
        run_1.wait()
    assert exit_info.value.code == 1
    expected = rf"error: output folder {re.escape(str(run_1_folder))} is in use .*pid {run_1.pid} "
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(expected, line), line
    assert files_of(run_1_folder) == RUN_1_FILES


@pytest.mark.parametrize("mode", [[], ["--eval-only"]], ids=["train", "eval-only"])
def test_a_lock_held_in_this_process_refuses_the_run_too(run_1_folder, monkeypatch, capsys, mode):
    """Run 1 as another lock object of this process: train_net's lock is not taken as its own."""
    with run_lock(run_1_folder), pytest.raises(SystemExit) as exit_info:
        train_net(monkeypatch, *mode, *RUN_2, f"train.output_dir={run_1_folder}")
    assert exit_info.value.code == 1
    assert "is in use by another run" in capsys.readouterr().err
    assert files_of(run_1_folder) == RUN_1_FILES


@pytest.mark.slow
def test_no_process_of_a_refused_launch_writes(run_1_folder):
    """Two processes (GLOO, ~10 s): the second lock-less one waits for the main one's lock and
    is refused with it, so it appends to no `log.txt.rank1` either."""
    (run_1_folder / "log.txt.rank1").write_bytes(b"[run 1, rank 1]\n")
    before = files_of(run_1_folder)
    run_1 = hold_in_another_process(run_1_folder)
    train_net_py = str(REPO_ROOT / "tools" / "train_net.py")
    command = [sys.executable, train_net_py, "--num-gpus", "2", "--config-file", DEMO_CONFIG,
               *RUN_2, f"train.output_dir={run_1_folder}"]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    try:
        run_2 = run_python(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        run_1.kill()
        run_1.wait()
    assert run_2.returncode != 0
    assert f"output folder {run_1_folder} is in use by another run" in run_2.stderr
    assert files_of(run_1_folder) == before


def test_the_holding_run_trains_and_releases_the_folder(run_1_folder, monkeypatch):
    """The lock taken before default_setup is the run's own for do_train (no second lock that
    would refuse it), and ends with the run."""
    short = ["train.max_iter=1", "dataloader.train.total_batch_size=1",
             "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]  # fmt: skip
    train_net(monkeypatch, *TINY_OVERRIDES, *short, f"train.output_dir={run_1_folder}")
    assert (run_1_folder / "model_final.pth").is_file()
    assert b"max_iter: 1\n" in (run_1_folder / "config.yaml").read_bytes()  # this run's config
    # The demo's train.amp.dtype="auto": the log says at start which precision and why.
    log = (run_1_folder / "log.txt").read_text()
    precision = r"Training precision on cpu: (bf16 autocast|float32 \(autocast off\)); auto: "
    assert re.search(precision, log), log[-2000:]
    assert not (run_1_folder / OWNER_NAME).exists()
    with run_lock(run_1_folder):  # released
        pass
