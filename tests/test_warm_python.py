"""tests/warm_python.py gives what a fresh interpreter gives: the same stdout, stderr and exit
status as `subprocess.run` for the same script, and a fresh interpreter where a fork cannot."""

import os
import subprocess
import sys

import pytest

from tests import warm_python
from tests.warm_python import run_python

SCRIPT = """
import os, sys, threading, time
print("argv", sys.argv[1:], __name__, os.getcwd(), os.environ.get("WARM_TEST"))
print("to stderr", file=sys.stderr)
print("progress\\rdone")
what = sys.argv[1]
if what == "code":
    sys.exit(3)
if what == "message":
    sys.exit("a message")
if what == "raise":
    raise ValueError("boom")
if what == "signal":
    os.kill(os.getpid(), 9)
if what == "thread":  # a non-daemon thread still runs at the end: its output comes too
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
if what == "sleep":
    time.sleep(60)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("what", ["ok", "code", "message", "raise", "signal", "thread"])
def test_same_result_as_a_fresh_interpreter(script, tmp_path, what):
    command = [sys.executable, str(script), what]
    env = {**os.environ, "WARM_TEST": "yes"}
    cold = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    warm = run_python(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode,
        cold.stdout,
        cold.stderr,
    )
    assert "argv" in warm.stdout and warm.returncode == {"ok": 0, "code": 3, "signal": -9}.get(
        what, 0 if what == "thread" else 1
    )


PARENT = """
import os, torch
torch.set_num_threads(2)
print(os.getppid(), torch.randn(600, 600).mm(torch.randn(600, 600)).shape)
"""


def test_forks_from_the_server_and_runs_parallel_torch(tmp_path):
    """The child is not this process's (it is the server's), and OpenMP works in it."""
    path = tmp_path / "parent.py"
    path.write_text(PARENT)
    result = run_python([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    parent, shape = result.stdout.split(" ", 1)
    assert int(parent) != os.getpid() and shape.strip() == "torch.Size([600, 600])"


def test_an_import_time_variable_gets_a_fresh_interpreter(tmp_path):
    path = tmp_path / "parent.py"
    path.write_text(PARENT)
    threads = "3" if os.environ.get("OMP_NUM_THREADS") != "3" else "4"
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    result = run_python([sys.executable, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split(" ", 1)[0]) == os.getpid()


def test_a_large_environment_arrives_whole(tmp_path):
    """The request (argv, environment) is longer than one read of the server's socket."""
    path = tmp_path / "length.py"
    path.write_text("import os; print(len(os.environ['WARM_TEST_LARGE']))")
    env = {**os.environ, "WARM_TEST_LARGE": "x" * 300_000}
    result = run_python([sys.executable, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "300000", result.stderr


def test_a_timeout_kills_the_child(script):
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([sys.executable, str(script), "sleep"], capture_output=True, timeout=1)


def test_a_server_per_worker_environment_and_none_for_another(monkeypatch):
    """torch.compile sets TORCHINDUCTOR_CACHE_DIR in the worker: later commands still fork, from
    a server started with the new environment; going back reuses the first server. A command
    whose own environment differs from the worker's gets no server (a fresh interpreter)."""
    started = []

    class FakeServer:
        def __init__(self):
            self.env = dict(os.environ)
            self.process = subprocess.Popen(
                [sys.executable, "-c", "input()"], stdin=subprocess.PIPE
            )
            started.append(self)

        def close(self):
            self.process.kill()
            self.process.wait()

    monkeypatch.setattr(warm_python, "_Server", FakeServer)
    monkeypatch.setattr(warm_python, "_servers", {})
    usual = warm_python._server_for(dict(os.environ))
    assert usual is warm_python._server_for(dict(os.environ)) and len(started) == 1
    other = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": "/elsewhere"}
    assert warm_python._server_for(other) is None and len(started) == 1
    with monkeypatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
        changed = warm_python._server_for(dict(os.environ))
        assert changed is not usual and changed.env["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
    assert warm_python._server_for(dict(os.environ)) is usual and len(started) == 2
    assert warm_python._server_for({**os.environ, "UNRELATED_TO_IMPORTS": "1"}) is usual
    for server in started:
        server.close()


def test_a_server_that_cannot_start_leaves_fresh_interpreters_and_says_why(
    script, tmp_path, monkeypatch
):
    broken = tmp_path / "broken_server.py"
    broken.write_text("raise ImportError('no module named torch, say')\n")
    monkeypatch.setattr(warm_python, "__file__", str(broken))
    monkeypatch.setattr(warm_python, "_servers", {})
    monkeypatch.setattr(warm_python, "_failed", set())
    command = [sys.executable, str(script), "code"]
    with pytest.warns(UserWarning, match="no module named torch, say"):
        result = run_python(command, capture_output=True, text=True)
    assert result.returncode == 3 and "argv ['code']" in result.stdout
    assert warm_python._server_for(dict(os.environ)) is None  # not tried again
