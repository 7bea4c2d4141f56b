"""A full disk during a checkpoint save: one line naming the file, the free space and the
checkpoint's size (exit status 1 from train_net); the previous checkpoint, the `last_checkpoint`
pointer and the folder (no temporary file left) stay as they were.

torch.save reports a failed write() as "RuntimeError: [enforce fail at inline_container.cc] ...
unexpected pos", with the OSError only in its context: the disk is filled here by a file object
whose write() raises ENOSPC, so the error goes through torch.save's real zip writer.
"""

import errno
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import rankdetr.engine.checkpoint as checkpoint_module
from rankdetr.engine.checkpoint import CheckpointError, SafeCheckpointer, is_complete_checkpoint
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"
ONE_LINE = re.compile(
    r"cannot write (?P<path>\S+): No space left on device "
    r"\((?P<free>\d+\.\d) MB free, the checkpoint needs ~(?P<size>\d+\.\d) MB\)"
)

# Shared by the in-process tests and the training run: after `ROOM` bytes of a .pth file, every
# write() fails as a full disk's does.
FULL_DISK = textwrap.dedent("""
    import builtins, errno, io, os

    class FullDiskFile(io.BufferedWriter):
        def __init__(self, raw, room):
            super().__init__(raw)
            self.room = room

        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def open_on_a_full_disk(room, checkpoints_before_full=0):
        saved = []

        def open_(path, mode="r", *args, **kwargs):
            if "w" not in mode or not str(path).split(".tmp-")[0].endswith(".pth"):
                return builtins.open(path, mode, *args, **kwargs)
            saved.append(path)
            if len(saved) <= checkpoints_before_full:
                return builtins.open(path, mode, *args, **kwargs)
            return FullDiskFile(io.FileIO(path, "wb"), room)

        return open_
    """)
full_disk: dict = {}
exec(FULL_DISK, full_disk)  # noqa: S102  (the same code runs in the training subprocess)


def linear(value: float, inputs: int = 3, outputs: int = 2) -> torch.nn.Module:
    model = torch.nn.Linear(inputs, outputs)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def assert_previous_checkpoint_intact(folder: Path, name: str, value: float) -> None:
    """Only `name` and the pointer to it are in `folder` (no temporary file), and it loads."""
    assert sorted(p.name for p in folder.iterdir()) == ["last_checkpoint", name]
    assert (folder / "last_checkpoint").read_text() == name
    checkpointer = SafeCheckpointer(linear(-1.0), str(folder))
    assert checkpointer.get_checkpoint_file() == str(folder / name)
    assert is_complete_checkpoint(folder / name)
    checkpointer.load(checkpointer.get_checkpoint_file())
    assert checkpointer.model.weight[0, 0].item() == value


@pytest.mark.parametrize("room", [0, 700], ids=["nothing-fits", "half-written"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, room):
    SafeCheckpointer(linear(3.0), str(tmp_path)).save("model_0000003")
    monkeypatch.setattr(
        checkpoint_module, "open", full_disk["open_on_a_full_disk"](room), raising=False
    )
    with pytest.raises(CheckpointError) as caught:
        SafeCheckpointer(linear(7.0), str(tmp_path)).save("model_0000007")
    message = str(caught.value)
    match = ONE_LINE.fullmatch(message)
    assert match, message
    assert match["path"] == str(tmp_path / "model_0000007.pth")
    free = shutil.disk_usage(tmp_path).free / 1e6
    assert abs(float(match["free"]) - free) < 50  # the same disk, measured a moment later
    # What torch raised is kept behind it, for RANKDETR_TRACEBACK=1: the OSError of the first
    # write, or torch's RuntimeError once its zip writer has started.
    raised = caught.value.__cause__
    assert "unexpected pos" in str(raised) if room else isinstance(raised, OSError)
    monkeypatch.undo()
    assert_previous_checkpoint_intact(tmp_path, "model_0000003.pth", 3.0)


def test_the_size_in_the_message_is_the_checkpoints(tmp_path, monkeypatch):
    model = linear(1.0, inputs=500, outputs=1000)  # 2 MB of weights
    SafeCheckpointer(model, str(tmp_path)).save("model_0000001")
    written = (tmp_path / "model_0000001.pth").stat().st_size / 1e6
    monkeypatch.setattr(
        checkpoint_module, "open", full_disk["open_on_a_full_disk"](10_000), raising=False
    )
    with pytest.raises(CheckpointError) as caught:
        SafeCheckpointer(model, str(tmp_path)).save("model_0000002")
    match = ONE_LINE.fullmatch(str(caught.value))
    assert match and abs(float(match["size"]) - written) <= 0.1, (str(caught.value), written)


def test_other_write_errors_name_the_file_with_the_system_reason(tmp_path, monkeypatch):
    class BrokenDiskFile(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(
        checkpoint_module, "open", lambda path, mode: BrokenDiskFile(io.FileIO(path, mode)),
        raising=False,
    )  # fmt: skip
    reason = re.escape(os.strerror(errno.EIO))
    with pytest.raises(CheckpointError, match=rf"^cannot write \S+model_0000002\.pth: {reason}$"):
        SafeCheckpointer(linear(2.0), str(tmp_path)).save("model_0000002")
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_is_not_the_file_systems_keeps_its_type(tmp_path, monkeypatch):
    def save_fails_on_a_bug(data, handle):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_fails_on_a_bug)
    with pytest.raises(RuntimeError, match="a bug in the writer") as caught:
        SafeCheckpointer(linear(2.0), str(tmp_path)).save("model_0000002")
    assert not isinstance(caught.value, CheckpointError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MB file system, where the system allows mounting one (root on Linux)."""
    folder = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)]
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("this system does not allow mounting a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_tmpfs(small_tmpfs):
    model = linear(1.0, inputs=500, outputs=1000)  # a 2 MB checkpoint: the second does not fit
    SafeCheckpointer(model, str(small_tmpfs)).save("model_0000001")
    with pytest.raises(CheckpointError) as caught:
        SafeCheckpointer(linear(5.0, 500, 1000), str(small_tmpfs)).save("model_0000002")
    match = ONE_LINE.fullmatch(str(caught.value))
    assert match and match["size"] == "2.0" and float(match["free"]) < 2.0, str(caught.value)
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert (small_tmpfs / "last_checkpoint").read_text() == "model_0000001.pth"
    assert is_complete_checkpoint(small_tmpfs / "model_0000001.pth")


# --- through tools/train_net.py -----------------------------------------------------------

# Trains on a small shapes dataset on a disk that fills up after the first checkpoint.
WRAPPER = FULL_DISK + textwrap.dedent("""
    import runpy, sys

    import rankdetr.engine.checkpoint as checkpoint
    from rankdetr.data import register_shapes_dataset

    register_shapes_dataset(root=sys.argv[1], num_images={"train": 4, "val": 2})
    checkpoint.open = open_on_a_full_disk(room=4096, checkpoints_before_full=1)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)

TINY = [
    "train.device=cpu",
    "train.max_iter=6",
    "train.checkpointer.period=2",  # model_0000001 fits, model_0000003 does not
    "train.eval_period=0",
    "dataloader.evaluator=None",  # no evaluation: not what this checks
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.train.mapper.augmentation.1.short_edge_length=[48]",
    "dataloader.train.mapper.augmentation.1.max_size=64",
    "dataloader.train.mapper.augmentation_with_crop.3.short_edge_length=[48]",
    "dataloader.train.mapper.augmentation_with_crop.3.max_size=64",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.num_queries=10",
    "model.num_queries_one2many=20",
    "model.num_detections=10",
]


def test_train_net_on_a_full_disk_says_so_in_one_line(tmp_path):
    wrapper, out_dir = tmp_path / "wrapper.py", tmp_path / "out"
    wrapper.write_text(WRAPPER)
    command = [sys.executable, str(wrapper), str(tmp_path / "shapes"), str(TRAIN_NET),
               "--config-file", str(DEMO), *TINY, f"train.output_dir={out_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RANKDETR_TRACEBACK", None)
    result = run_python(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    match = ONE_LINE.fullmatch(errors[0].removeprefix("error: "))
    assert match and match["path"] == str(out_dir / "model_0000003.pth"), errors[0]
    checkpoints = sorted(p.name for p in out_dir.iterdir() if ".pth" in p.name or "tmp" in p.name)
    assert checkpoints == ["model_0000001.pth"]  # and no temporary file
    assert (out_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    assert is_complete_checkpoint(out_dir / "model_0000001.pth")
