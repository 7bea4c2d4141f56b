"""Generation shared by concurrent processes, and recovery from killed or outdated runs.

Processes are forked (not spawned) so that they start in milliseconds with rankdetr imported.
"""

import contextlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from rankdetr.data import build_once
from rankdetr.data.build_once import MARKER_NAME, build_directory_once, read_marker
from rankdetr.data.synthetic import generate_shapes_dataset, shapes_split_paths

HAS_FORK = "fork" in multiprocessing.get_all_start_methods()
FORK = multiprocessing.get_context("fork") if HAS_FORK else None
pytestmark = pytest.mark.skipif(not HAS_FORK, reason="needs the fork start method")


def _generate_after_barrier(barrier, root: Path, num_images: int) -> None:
    barrier.wait()
    generate_shapes_dataset(root, "train", num_images, seed=1)


def _build_slowly_after_barrier(barrier, final_dir: Path, log_dir: Path) -> None:
    def build(out_dir: Path) -> None:
        (log_dir / f"built-by-{os.getpid()}").touch()
        time.sleep(0.3)  # long enough for the other processes to arrive meanwhile
        (out_dir / "content.txt").write_text("done")

    barrier.wait()
    build_directory_once(final_dir, {"v": 1}, build)


def _run_together(target, args_per_process) -> None:
    processes = [FORK.Process(target=target, args=args) for args in args_per_process]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0


def _leftovers(parent: Path) -> list[Path]:
    return [path for path in parent.iterdir() if ".tmp-" in path.name or ".old-" in path.name]


def test_processes_starting_together_build_once(tmp_path):
    barrier = FORK.Barrier(3)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    final_dir = tmp_path / "out" / "built"
    _run_together(_build_slowly_after_barrier, [(barrier, final_dir, log_dir)] * 3)
    assert len(list(log_dir.iterdir())) == 1  # the others waited on the lock and reused it
    assert (final_dir / "content.txt").read_text() == "done"
    assert read_marker(final_dir) == {"v": 1}
    assert not _leftovers(final_dir.parent)


def test_without_file_locks_concurrent_builds_still_end_complete(tmp_path, monkeypatch):
    # Some network file systems refuse locks: every process builds, the first rename wins.
    monkeypatch.setattr(build_once, "_exclusive_lock", _no_lock)
    barrier = FORK.Barrier(3)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    final_dir = tmp_path / "out" / "built"
    _run_together(_build_slowly_after_barrier, [(barrier, final_dir, log_dir)] * 3)
    assert len(list(log_dir.iterdir())) == 3
    assert (final_dir / "content.txt").read_text() == "done"
    assert read_marker(final_dir) == {"v": 1}
    assert not _leftovers(final_dir.parent)


@contextlib.contextmanager
def _no_lock(lock_file):
    yield False


def test_two_ranks_generating_the_same_dataset_get_one_valid_copy(tmp_path):
    barrier = FORK.Barrier(2)
    _run_together(_generate_after_barrier, [(barrier, tmp_path / "shapes", 12)] * 2)
    json_file, image_root = shapes_split_paths(tmp_path / "shapes", "train")
    data = json.loads(json_file.read_text())
    assert sorted(path.name for path in image_root.iterdir()) == sorted(
        image["file_name"] for image in data["images"]
    )
    reference = generate_shapes_dataset(tmp_path / "reference", "train", 12, seed=1)
    assert json_file.read_bytes() == reference.read_bytes()
    assert not _leftovers(tmp_path / "shapes")


def test_a_killed_generation_is_cleaned_up_and_regenerated(tmp_path):
    root = tmp_path / "shapes"
    child = FORK.Process(target=generate_shapes_dataset, args=(root, "train", 2000, 1))
    child.start()
    deadline = time.monotonic() + 30
    while len(list(root.glob(".train.tmp-*/train/images/*.png"))) < 5:
        assert time.monotonic() < deadline and child.is_alive()
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not (root / "train").exists() and _leftovers(root)  # only the temporary folder

    json_file = generate_shapes_dataset(root, "train", 4, seed=1)
    assert len(json.loads(json_file.read_text())["images"]) == 4
    assert not _leftovers(root)


def test_a_folder_without_completion_marker_is_regenerated(tmp_path):
    # What a writer that was not atomic (or an interrupted copy) would leave behind.
    half_written = tmp_path / "train" / "images"
    half_written.mkdir(parents=True)
    (half_written / "000001.png").write_bytes(b"truncated")
    json_file = generate_shapes_dataset(tmp_path, "train", 3, seed=1)
    assert len(json.loads(json_file.read_text())["images"]) == 3
    assert (half_written / "000001.png").read_bytes().startswith(b"\x89PNG")
    assert read_marker(tmp_path / "train")["num_images"] == 3


def test_other_settings_replace_the_existing_copy_and_same_settings_reuse_it(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "val", 3, seed=2)
    marker = tmp_path / "val" / MARKER_NAME
    modified = marker.stat().st_mtime_ns
    generate_shapes_dataset(tmp_path, "val", 3, seed=2)
    assert marker.stat().st_mtime_ns == modified  # reused, not rewritten
    generate_shapes_dataset(tmp_path, "val", 5, seed=2)
    assert len(json.loads(json_file.read_text())["images"]) == 5
    assert len(list((tmp_path / "val" / "images").iterdir())) == 5
