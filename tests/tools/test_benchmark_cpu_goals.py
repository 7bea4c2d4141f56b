"""tools/benchmark_cpu_goals.py: which goals run where, how it reads pytest's and detectron2's
output, and a whole run (logs, heartbeat, table, exit status) with a real pytest session
standing in for `make test`.

The readers of the other tools' tables are checked on those tools' real output in their own
tests (tests/tools/test_benchmark_train_step.py, tests/evaluation/test_fast_eval.py,
tests/engine/test_engine.py for the AP in metrics.json), which run the tools anyway.
"""

import datetime
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, load_tool

goals = load_tool(REPO_ROOT / "tools" / "benchmark_cpu_goals.py", "benchmark_cpu_goals")

# A pytest session of three tests: one passes, one is skipped, one sleeps long enough for a
# heartbeat line and passes.
SESSION = """
import time, pytest

def test_passes():
    pass

def test_skipped():
    pytest.skip("a reason")

def test_sleeps_then_passes():
    time.sleep(0.6)
"""


def pytest_command(folder, *options):
    (folder / "test_session.py").write_text(SESSION)
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", "/dev/null",
            "--rootdir", str(folder), str(folder / "test_session.py"), *options]  # fmt: skip


def test_reads_the_counts_and_seconds_of_a_quiet_pytest_summary(tmp_path):
    """`-q` prints the summary without its rules (the full format: the run test below)."""
    run = subprocess.run(pytest_command(tmp_path, "-q"), capture_output=True, text=True)
    counts, seconds = goals.pytest_summary(run.stdout)
    assert counts == {"passed": 2, "skipped": 1}
    assert 0.6 <= seconds < 60


def test_reads_detectron2s_training_speed_line():
    # detectron2's TimerHook's line (engine/hooks.py), its duration a str(timedelta).
    duration = str(datetime.timedelta(seconds=222))
    line = f"Overall training speed: 1100 iterations in {duration} ({0.2018:.4f} s / it)"
    log = f"[12/07 16:01:02 d2.engine.hooks]: {line}\n[12/07 16:01:02 d2]: later\n"
    assert goals.training_speed(log) == (1100, 0.2018)
    assert goals.training_speed("no such line") is None


def test_the_bf16_ratio_is_the_bf16_step_over_the_float32_step(monkeypatch):
    table = (
        "| variant                 | train step (s)   | inference (s)   |\n"
        "|-------------------------|------------------|-----------------|\n"
        "| rankdetr                | 4.00             | 0.50            |\n"
        "| rankdetr, bf16 autocast | 1.80             | 0.40            |\n"
    )
    bf16 = next(goal for goal in goals.GOALS if goal.name == "bf16")
    monkeypatch.setattr(goals, "_native_bf16", lambda: True)
    outcome = bf16.read(table, 0.0, REPO_ROOT)
    assert outcome.measured.startswith("0.45x") and outcome.met is True
    monkeypatch.setattr(goals, "_native_bf16", lambda: False)
    assert bf16.read(table, 0.0, REPO_ROOT).met is None  # not this CPU's goal


def test_default_goals_are_those_that_apply_here_and_named_goals_run_anyway(monkeypatch):
    monkeypatch.setattr(goals, "_native_bf16", lambda: False)
    skipped = {g.name: why for g, why in goals.selected_goals(goals.parse_args([]))}
    assert skipped == {"coco_eval": None, "bf16": "no native bf16 (auto: float32)",
                       "release": "no --release-path", "demo": None, "suite": None}  # fmt: skip
    named = goals.selected_goals(goals.parse_args(["--goals", "bf16", "suite"]))
    assert [g.name for g, why in named if why is None] == ["bf16", "suite"]
    with pytest.raises(SystemExit):  # the release goal cannot run without the release
        goals.parse_args(["--goals", "release"])


def run_suite_goal(tmp_path, monkeypatch, command):
    """goals.main for the suite goal with `command` for `make test`: (exit status,
    the report's suite row, the report)."""
    suite = next(goal for goal in goals.GOALS if goal.name == "suite")
    monkeypatch.setattr(suite, "command", lambda args, workdir: command)
    monkeypatch.setattr(goals, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(goals, "machine_line", lambda: "a test machine")
    probes = iter([101.0, 87.0])
    monkeypatch.setattr(goals, "matmul_gflops", lambda threads: next(probes))
    report = tmp_path / "goals.md"
    argv = ["--goals", "suite", "--log-dir", str(tmp_path / "logs"), "--output", str(report)]
    status = goals.main(argv)
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| suite"))
    return status, row, text


def test_a_run_logs_beats_and_tabulates(tmp_path, monkeypatch, capsys):
    """The suite goal with a 3-test pytest session for `make test`: its log file, a heartbeat
    line while it runs, the table (measured, target, met) and exit status 0."""
    status, row, report = run_suite_goal(tmp_path, monkeypatch, pytest_command(tmp_path))
    assert re.search(r"\n  suite: \d+ s \| ", capsys.readouterr().out)  # the heartbeat
    assert "test_session.py" in (tmp_path / "logs" / "suite.log").read_text()
    assert report.startswith("Machine: a test machine")
    assert "on 2 threads): 101 GFLOP/s before the goals, 87 after" in report
    assert len([line for line in report.splitlines() if "| not run: not in --goals |" in line]) == 4
    assert "pytest 0 min" in row and "(2 passed, 1 skipped)" in row
    assert "| pytest <= 6 min (make test) | yes |" in row
    assert status == 0


def test_a_failed_command_is_a_missed_goal(tmp_path, monkeypatch):
    command = [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"]
    status, row, _ = run_suite_goal(tmp_path, monkeypatch, command)
    assert "exit status 3" in row and row.endswith("| **no** |")
    assert status == 1
    assert (tmp_path / "logs" / "suite.log").read_text() == "broken\n"


def test_the_speed_probe_measures_at_the_threads_asked_and_restores_them():
    import torch

    threads = torch.get_num_threads()
    seen = []
    original = torch.set_num_threads

    def record(n):
        seen.append(n)
        original(n)

    try:
        torch.set_num_threads = record
        rate = goals.matmul_gflops(threads=1, rounds=2, seconds=0.05)
    finally:
        torch.set_num_threads = original
    assert seen == [1, threads]
    # Between a slow scalar loop (~1 GFLOP/s) and more than any 2-core CPU computes.
    assert 1 < rate < 2000


def test_durations_round_to_the_second_before_splitting_minutes():
    assert goals._minutes(119.6) == "2 min 0 s" and goals._minutes(484.4) == "8 min 4 s"
