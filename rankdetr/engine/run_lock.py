"""One training run per output folder.

Two runs writing checkpoints into one `train.output_dir` would overwrite each other's files.
:func:`run_lock` holds an exclusive `flock` on `<output_dir>/.run.lock` for the whole run; the
file also records who holds it (pid, host, start time), for the message a second run gets. The
operating system releases the lock when the holding process ends, however it ends, so the lock of
a killed run never blocks: the file may stay, but it is no longer locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from rankdetr.errors import UserError

__all__ = ["OutputDirInUseError", "run_lock", "process_is_alive"]

LOCK_NAME = ".run.lock"


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
    with open(path, "a+") as handle:  # closing it releases the flock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = _describe_holder(handle.read())
            raise OutputDirInUseError(
                f"output folder {folder} is in use by another run ({holder}); wait for it to "
                "end, or choose another train.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
        handle.write(json.dumps(info))
        handle.flush()
        yield path


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"
