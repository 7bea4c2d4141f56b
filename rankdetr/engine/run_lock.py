"""One training run per output folder.

Two runs writing checkpoints into one `train.output_dir` would overwrite each other's files.
:func:`run_lock` holds `<output_dir>/.run.lock` with the `filelock` library (an operating-system
lock, `flock` on Linux) for the whole run. The operating system releases the lock when the holding
process ends, however it ends, so the lock of a killed run never blocks: the file may stay, but it
is no longer locked. Who holds it (pid, host, start time) is written beside it, to
`.run.lock.owner`, for the message a second run gets (some filelock versions empty the lock file
itself when they open it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from rankdetr.errors import UserError

__all__ = ["OutputDirInUseError", "run_lock", "process_is_alive"]

LOCK_NAME = ".run.lock"
OWNER_NAME = ".run.lock.owner"


class OutputDirInUseError(RuntimeError, UserError):
    """Another live run holds the output folder."""


def process_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold `output_dir` for this process; raise OutputDirInUseError naming the folder and the
    other process when a live run holds it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    owner = folder / OWNER_NAME
    # A fresh FileLock object per call: filelock counts re-acquisitions of one object, and a
    # second run in the same process must be refused like one in another process.
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirInUseError(
            f"output folder {folder} is in use by another run ({_describe_owner(owner)}); wait "
            "for it to end, or choose another train.output_dir"
        ) from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
        owner.write_text(json.dumps(info))
        yield path
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _describe_owner(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that left no details"
