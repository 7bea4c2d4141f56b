"""Build a directory once, safely when several processes (DDP ranks) ask for it at the same time
and after a run that was killed half-way.

A build writes into a fresh temporary sibling folder, ends by writing a completion marker (a JSON
"stamp" describing what was built) into it, and is then renamed into place. A rename within one
file system is atomic, so the final folder is either absent or complete. An exclusive file lock
lets one process build while the others wait and then reuse its result; where the file system
has no working locks, concurrent builds still end with one complete folder (the first rename
wins, the others discard their copy).

A final folder without a marker, or with a marker of another stamp (e.g. an older generator
version), is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["MARKER_NAME", "build_directory_once", "read_marker"]

logger = logging.getLogger(__name__)

MARKER_NAME = ".complete.json"


def read_marker(directory: Path) -> dict | None:
    """The stamp of a complete build in `directory`, or None when there is none (or unreadable)."""
    try:
        return json.loads((Path(directory) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(directory: Path, stamp: dict) -> bool:
    # Compare as read back from JSON, where tuples have become lists.
    return read_marker(directory) == json.loads(json.dumps(stamp))


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_file`; yields False where the OS or file system has none."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield False
        return
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. ENOLCK on some network file systems
            logger.warning("no file lock on %s (%s); building without one", lock_file, error)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    """Delete a folder by first renaming it aside, so that it vanishes from its name at once."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(final_dir: Path) -> None:
    """Temporary folders of killed builds; only safe while holding the lock."""
    for pattern in (f".{final_dir.name}.tmp-*", f".{final_dir.name}.old-*"):
        for leftover in final_dir.parent.glob(pattern):
            logger.info("removing %s, left by an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(built: Path, final_dir: Path, stamp: dict) -> None:
    try:
        os.rename(built, final_dir)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        # Another process (without a working lock) renamed its build first: keep that one.
        if not _is_complete(final_dir, stamp):
            raise RuntimeError(f"{final_dir} appeared, incomplete, during the build") from error


def build_directory_once(final_dir: Path | str, stamp: dict, build: Callable[[Path], None]) -> Path:
    """Make `final_dir` hold a complete build described by `stamp`, building it only if needed.

    Args:
        final_dir: the folder to produce; its parent is created if missing.
        stamp: JSON-serialisable description of the content (e.g. generator version, sizes,
            seeds); a folder with another stamp is rebuilt.
        build: writes the content into the empty folder it is given (not `final_dir` itself).

    Returns:
        `final_dir`, complete.
    """
    final_dir = Path(final_dir)
    if _is_complete(final_dir, stamp):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final_dir.parent / f".{final_dir.name}.lock") as locked:
        if _is_complete(final_dir, stamp):  # built by another process while we waited
            return final_dir
        if locked:
            _remove_leftovers(final_dir)
        if final_dir.exists():
            marker = read_marker(final_dir)
            logger.warning(
                "%s is incomplete or outdated (marker %s); rebuilding", final_dir, marker
            )
            _remove_tree(final_dir)
        workspace = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            built = workspace / final_dir.name
            built.mkdir()
            build(built)
            (built / MARKER_NAME).write_text(json.dumps(stamp, sort_keys=True) + "\n")
            _move_into_place(built, final_dir, stamp)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
    return final_dir
