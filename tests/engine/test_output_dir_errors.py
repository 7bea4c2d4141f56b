"""An output folder that cannot be written (read-only, a name too long) and a training batch of
0 images end tools/train_net.py with one line naming the folder or the key (exit status 1), not
a traceback, and before anything is written."""

import os
import re
import subprocess

import pytest

from tests.engine.test_lock_first import train_net
from tests.test_predictor import TINY_OVERRIDES


def refusal_of(monkeypatch, capsys, *args: str) -> str:
    """train_net's one stderr line for a run that must end with exit status 1 (`args`: flags
    first, then overrides)."""
    with pytest.raises(SystemExit) as exit_info:
        train_net(monkeypatch, *args, *TINY_OVERRIDES)
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    return line


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in: permissions for a normal user; for root, whom
    permissions do not stop, a read-only tmpfs mounted there (skipped where root cannot mount)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)  # lazy: never left mounted


def unwritable_message(folder) -> str:
    return rf"error: cannot write to the output folder {re.escape(str(folder))}: .+ \(set train"


@pytest.mark.parametrize("mode", [[], ["--eval-only"]], ids=["train", "eval-only"])
@pytest.mark.parametrize("below", ["", "run"], ids=["the-folder", "a-new-folder-in-it"])
def test_a_read_only_output_folder_is_one_line(read_only_folder, monkeypatch, capsys, mode, below):
    output_dir = read_only_folder / below if below else read_only_folder
    line = refusal_of(monkeypatch, capsys, *mode, f"train.output_dir={output_dir}")
    assert re.match(unwritable_message(output_dir), line), line


def test_an_output_folder_name_too_long_is_one_line(tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / ("run" * 100)  # 300 characters: above every file system's 255
    line = refusal_of(monkeypatch, capsys, f"train.output_dir={output_dir}")
    assert re.match(unwritable_message(output_dir), line), line
    assert not any(tmp_path.iterdir())


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "a_file"
    output_dir.write_text("not a folder")
    line = refusal_of(monkeypatch, capsys, f"train.output_dir={output_dir}")
    assert re.match(unwritable_message(output_dir), line), line


def test_a_batch_of_no_images_is_one_line(tmp_path, monkeypatch, capsys):
    line = refusal_of(monkeypatch, capsys, f"train.output_dir={tmp_path / 'out'}",
                      "dataloader.train.total_batch_size=0")  # fmt: skip
    assert line == "error: dataloader.train.total_batch_size must be an integer >= 1, got 0"
    assert not (tmp_path / "out").exists()
