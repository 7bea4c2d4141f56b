"""One training run per output folder.

Two runs writing checkpoints into one `train.output_dir` would overwrite each other's files.
:func:`run_lock` holds `<output_dir>/.run.lock` with the `filelock` library (an operating-system
lock, `flock` on Linux) for the whole run. The operating system releases the lock when the holding
process ends, however it ends, so the lock of a killed run never blocks: the file may stay, but it
is no longer locked. Who holds it (pid, host, start time) is written beside it, to
`.run.lock.owner`, for the message a second run gets (some filelock versions empty the lock file
itself when they open it).

:func:`hold_output_dir` is what a run takes: tools/train_net.py takes it before anything is
written to the folder (detectron2's `default_setup` writes `config.yaml` and `log.txt`), and
`do_train` takes it again inside, which is then a no-op. A folder that cannot be created or
written (read-only, a name too long) is one :class:`OutputDirUnusableError` naming it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from rankdetr.errors import UserError

__all__ = [
    "OutputDirInUseError",
    "OutputDirUnusableError",
    "hold_output_dir",
    "run_lock",
    "process_is_alive",
]

LOCK_NAME = ".run.lock"
OWNER_NAME = ".run.lock.owner"

# The folder that the run in this context (thread) holds with hold_output_dir, if any.
_HELD_BY_THIS_RUN: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "rankdetr_output_dir_held", default=None
)


class OutputDirInUseError(RuntimeError, UserError):
    """Another live run holds the output folder."""


class OutputDirUnusableError(OSError, UserError):
    """The output folder cannot be created or written (read-only, a name too long, ...)."""


def process_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _unusable(folder: Path, error: OSError) -> OutputDirUnusableError:
    reason = error.strerror or str(error)
    return OutputDirUnusableError(
        f"cannot write to the output folder {folder}: {reason} (set train.output_dir to a "
        "writable folder)"
    )


def _acquire(folder: Path) -> FileLock:
    """Create `folder` and lock it, or raise the user error that says why not."""
    # A fresh FileLock object per call: filelock counts re-acquisitions of one object, and a
    # second run in the same process must be refused like one in another process.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / LOCK_NAME, timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputDirInUseError(
            f"output folder {folder} is in use by another run "
            f"({_describe_owner(folder / OWNER_NAME)}); wait for it to end, or choose another "
            "train.output_dir"
        ) from None
    except OSError as error:  # read-only file system, no permission, name too long, a file
        raise _unusable(folder, error) from error
    return lock


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold `output_dir` for this process; raise OutputDirInUseError naming the folder and the
    other process when a live run holds it (in this process too), and OutputDirUnusableError
    when the folder cannot be created or written."""
    folder = Path(output_dir)
    lock = _acquire(folder)
    owner = folder / OWNER_NAME
    try:
        _write_owner(owner)
        yield folder / LOCK_NAME
    finally:
        with contextlib.suppress(OSError):  # a stale owner file is harmless (see above)
            owner.unlink(missing_ok=True)
        lock.release()


def _write_owner(owner: Path) -> None:
    """Who holds the lock, for the message a second run gets."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
    try:
        owner.write_text(json.dumps(info))
    except OSError as error:  # e.g. the folder's full path is too long for one more name
        raise _unusable(owner.parent, error) from error


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path | None) -> Iterator[None]:
    """Hold `output_dir` for a run, in every process of a launch.

    The main process takes :func:`run_lock`, unless this run holds the folder already: a nested
    hold_output_dir (in the same thread) is a no-op, so tools/train_net.py can hold the folder
    before writing to it and do_train hold it again for its other callers. Any other holder,
    another process or a run_lock taken in this one, refuses the run. The other processes of a
    launch lock nothing: they wait for the main one and raise its refusal too, so that none of
    them writes into a folder another run holds. A run without an output folder
    (train.output_dir empty or None) writes no files and holds nothing.
    """
    if not output_dir:
        yield
        return
    from detectron2.utils import comm  # here: run_lock alone needs no torch

    folder = Path(os.path.abspath(output_dir))  # no file system call: a path may be unusable
    refusal, token = None, None
    with contextlib.ExitStack() as stack:
        if comm.is_main_process() and _HELD_BY_THIS_RUN.get() != folder:
            try:
                stack.enter_context(run_lock(output_dir))
                token = _HELD_BY_THIS_RUN.set(folder)
            except (OutputDirInUseError, OutputDirUnusableError) as error:
                refusal = error
        _raise_main_process_refusal(comm, refusal)
        try:
            yield
        finally:
            if token is not None:
                _HELD_BY_THIS_RUN.reset(token)


def _raise_main_process_refusal(comm, refusal: Exception | None) -> None:
    """Every process raises the main process's refusal (all of them call this, in step)."""
    refusal = comm.all_gather(refusal)[0]
    if refusal is not None:
        raise refusal


def _describe_owner(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that left no details"
