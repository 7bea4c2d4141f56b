"""`run_python`: `subprocess.run` for the tests' ``[sys.executable, tool.py, ...]`` commands, with
the imports already done.

A fresh ``python tools/train_net.py`` spends ~6 s of CPU importing torch, torchvision (which
imports torch._dynamo), detectron2 and rankdetr before it reads its first argument (2-core AMD
EPYC, README "Development"); the suite starts dozens of such tools. Here a server process per
pytest worker (one per environment it has had, up to 3) imports them once and forks a child
per command: the child takes the command's stdin/stdout/stderr file descriptors, working
folder, environment and argv, and runs the script as ``__main__`` (``runpy``), as the
interpreter would. Its exit status reaches the caller as a `subprocess.CompletedProcess`, -N
where a signal N ended it.

What a fork cannot give, a fresh interpreter does (`run_python` falls back to `subprocess.run`):
a command that is not ``python script.py ...``, and an environment that differs from the
server's in what is read at import time (threads, instruction sets, allocator, paths: the
prefixes in IMPORT_TIME_ENV). A test about what gets imported, or about a process it kills or
talks to while it runs, uses subprocess itself. The server never runs a parallel region before
it forks (OpenMP is not fork-safe once its threads exist), which `serve` checks.

Set RANKDETR_TEST_COLD_PYTHON=1 to run every command in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import locale
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

PRELOAD = (
    "torch",
    "torchvision",
    "torch._dynamo",
    "detectron2.config",
    "detectron2.data",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.checkpoint",
    "rankdetr",
    "rankdetr.engine",
    "rankdetr.data",
    "rankdetr.modeling",
)
# Environment variables that libraries read when they are loaded: a command that sets one of them
# differently from the server's environment needs an interpreter that starts with it.
IMPORT_TIME_ENV = (
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "DNNL_",
    "ONEDNN_",
    "ATEN_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NVIDIA_",
    "LD_",
    "PYTHON",
    "MALLOC_",
    "GLIBC_",
    "DETECTRON2_",
    "FVCORE_",
    "IOPATH_",
    "TIMM_",
    "HF_",
)
_READY = "warm-python ready"


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


# -- the server (its own process: `python tests/warm_python.py SOCKET`) ---------------------------


def _exit_code(error: SystemExit) -> int:
    """The status `python` exits with for a SystemExit (None -> 0, a message -> printed, 1)."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python script args...` and never return."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][1]
        sys.argv = request["argv"][1:]
        sys.path[0] = str(Path(script).resolve().parent)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as error:
            code = _exit_code(error)
        except BaseException as error:  # noqa: BLE001 - the interpreter prints it, as here
            frames = error.__traceback__
            while frames is not None and frames.tb_frame.f_code.co_filename != script:
                frames = frames.tb_next  # from the script's frame on, without runpy's and ours
            traceback.print_exception(type(error), error, frames or error.__traceback__)
            code = 1
        threading._shutdown()  # as at the interpreter's exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(code)


def _single_threaded() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def serve(path: str) -> None:
    """Import PRELOAD, say ready on stdout, then fork a child per request until stdin closes."""
    for name in PRELOAD:
        __import__(name)
    if not _single_threaded():
        raise SystemExit(f"warm-python: threads after the imports: {os.listdir('/proc/self/task')}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "parent")  # EOF: the worker has gone
    print(_READY, flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "parent":
                return
            if key.data == "accept":
                connection, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
                while not message.endswith(b"\n"):  # a stream: the request may come in parts
                    part = connection.recv(1 << 16)
                    if not part:
                        break
                    message += part
                try:
                    request = json.loads(message)
                except ValueError:  # the caller went away mid-request
                    for fd in fds:
                        os.close(fd)
                    connection.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    connection.close()
                    _run_child(request, fds)
                for fd in fds:
                    os.close(fd)
                connection.sendall(f"{pid}\n".encode())
                selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, connection))
            else:
                pid, connection = key.data
                selector.unregister(key.fileobj)
                os.close(key.fileobj)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # unless the caller gave up (timeout)
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                connection.close()


# -- the client (in the pytest worker) ---------------------------------------------------------


class _Server:
    """The worker's server: started at the first command, ended with the worker."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="warm-python-")
        self.path = os.path.join(self.folder, "socket")
        self.env = dict(os.environ)
        errors = os.path.join(self.folder, "server.err")  # the imports' warnings, or why it failed
        with open(errors, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, __file__, self.path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=self.env,
            )
        atexit.register(self.close)
        line = self.process.stdout.readline().strip()
        if line != _READY:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
            said = Path(errors).read_text(errors="replace")[-2000:]
            self.close()
            raise RuntimeError(f"the warm-python server did not start: {line!r}\n{said}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the server returns on EOF
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


_servers: dict[frozenset, _Server] = {}  # by import-time environment, oldest first
_MAX_SERVERS = 3
_failed: set[frozenset] = set()  # environments whose server did not start: not tried again
_server_lock = threading.Lock()


def _server_for(env: dict[str, str]) -> _Server | None:
    """A server whose import-time environment is `env`'s, or None where `env` is not this
    worker's own (then only a fresh interpreter starts with it). A test that changed the worker's
    environment (torch's inductor sets TORCHINDUCTOR_CACHE_DIR, monkeypatch.setenv) gets a server
    started with it; the last few are kept, so a test file's own environment and the usual one
    do not restart each other."""
    key = frozenset(_import_time_env(env).items())
    with _server_lock:
        server = _servers.get(key)
        if server is not None and server.process.poll() is None:
            return server
        if key != frozenset(_import_time_env(os.environ).items()) or key in _failed:
            return None
        if server is not None:  # it has ended: forget it
            _servers.pop(key).close()
        if len(_servers) >= _MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        try:
            _servers[key] = _Server()
        except (OSError, RuntimeError) as error:  # slower, not wrong: fresh interpreters
            _failed.add(key)
            message = f"tests/warm_python.py: {error}; commands run in fresh interpreters"
            warnings.warn(message, stacklevel=3)
            return None
        return _servers[key]


def _is_python_script(args: list[str]) -> bool:
    return len(args) >= 2 and args[0] == sys.executable and args[1].endswith(".py")


def _read(file, text: bool):
    """The file's bytes, or as `subprocess.run(text=True)` gives them: decoded in the locale's
    encoding with universal newlines (a "\\r" of a progress bar becomes "\\n")."""
    file.seek(0)
    if not text:
        return file.read()
    return io.TextIOWrapper(file, encoding=locale.getpreferredencoding(False)).read()


def run_python(
    args,
    *,
    capture_output: bool = False,
    text: bool = False,
    cwd=None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """`subprocess.run(args, ...)` for ``[sys.executable, script.py, *arguments]``, run in a child
    of the warm server where that is the same as a fresh interpreter (module docstring), else by
    `subprocess.run`. Stdin is empty (/dev/null); without capture_output the output goes where
    this process's goes."""
    args = [str(a) for a in args]
    server = None
    cold = os.environ.get("RANKDETR_TEST_COLD_PYTHON") == "1" or not hasattr(os, "pidfd_open")
    if _is_python_script(args) and not cold:
        server = _server_for(dict(env if env is not None else os.environ))
    if server is None:
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=capture_output,
            text=text,
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=check,
        )
    request = {
        "argv": args,
        "cwd": str(cwd if cwd is not None else os.getcwd()),
        "env": dict(env if env is not None else os.environ),
    }
    with (
        open(os.devnull, "rb") as stdin,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        # Without capture the child writes where this process's fds 1 and 2 go (pytest's capture).
        fds = (
            [stdin.fileno(), out.fileno(), err.fileno()]
            if capture_output
            else [stdin.fileno(), 1, 2]
        )
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with connection, connection.makefile("r") as replies:
            connection.connect(server.path)
            socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], fds)
            pid = int(replies.readline())
            connection.settimeout(timeout)
            started = time.monotonic()
            try:
                returncode = int(replies.readline())
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(args, time.monotonic() - started) from None
        stdout = _read(out, text) if capture_output else None
        stderr = _read(err, text) if capture_output else None
    result = subprocess.CompletedProcess(args, returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    serve(sys.argv[1])
