"""tools/benchmark_train_step.py: its options, a tiny run without the release (which must not be
imported then), and, where a release tree is given, the side-by-side comparison on tiny sizes.

The comparison needs the original release (LeapLabTHU/Rank-DETR, a detrex tree) and its extra
packages in a pip --target folder; it runs when `RANKDETR_RELEASE_PATH` (and, if needed,
`RANKDETR_RELEASE_DEPS`) name them, and is skipped otherwise.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, load_tool
from tests.warm_python import run_python

SCRIPT = REPO_ROOT / "tools" / "benchmark_train_step.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool(SCRIPT, "benchmark_train_step")


def test_options_default_to_no_release_and_the_r50_sizes(tool):
    args = tool.parse_args([])
    assert args.release_path is None and args.size == "r50"
    assert tool.SIZES["r50"]["queries"] == (300, 1500)


def test_a_release_path_without_the_release_is_refused(tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--release-path", str(tmp_path)])
    assert "rank_detr_r50.py" in capsys.readouterr().err


def test_the_loss_check_runs_on_an_unpadded_batch(tool, monkeypatch):
    """compare_with_release checks the losses on the batch with both images at the first size
    (padded positions give the release identical proposals whose rank order is rounding noise);
    the timed batch keeps its padded 80x96 image. The release is stood in for by our own model's
    weights, and the run stops at the check."""
    import argparse
    import copy

    import rankdetr.checkpoint

    model = tool.build_model(depth=18, num_queries=20, num_queries_one2many=60)
    batch = tool.fixed_batch(tool.SIZES["tiny"]["images"])
    stand_in = copy.deepcopy(model)
    checked = []

    def record_and_stop(ours, release, check_batch):
        checked.append(check_batch)
        raise SystemExit("stop before timing")

    monkeypatch.setattr(tool, "import_release", lambda *args: None)
    monkeypatch.setattr(tool, "build_release_model", lambda *args: stand_in)
    monkeypatch.setattr(tool, "randomize_zero_parameters", lambda release: None)
    monkeypatch.setattr(rankdetr.checkpoint, "convert_release_state_dict", lambda state: state)
    monkeypatch.setattr(tool, "check_same_losses", record_and_stop)
    args = argparse.Namespace(release_path=None, release_deps=None, size="tiny", compile=False)
    with pytest.raises(SystemExit, match="stop before timing"):
        tool.compare_with_release(args, model, batch, None)
    (check_batch,) = checked
    assert [tuple(s["image"].shape[1:]) for s in batch] == [(96, 96), (80, 96)]
    assert [tuple(s["image"].shape[1:]) for s in check_batch] == [(96, 96), (96, 96)]
    assert all((s["height"], s["width"]) == (96, 96) for s in check_batch)
    assert all(len(s["instances"]) == 2 for s in check_batch)


WRAPPER = f"""
import runpy, sys
sys.argv = ["benchmark_train_step.py", *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
print("imported detrex:", "detrex" in sys.modules)
"""


def run(*options: str, wrapper: Path, fresh: bool = False) -> subprocess.CompletedProcess:
    """The script on tiny sizes, one thread, in its own process (fresh: a new interpreter, not a
    warm fork); reports whether the release's packages got imported."""
    wrapper.write_text(WRAPPER)
    command = [sys.executable, str(wrapper), "--size", "tiny", "--threads", "1", "--repeats", "1"]
    runner = subprocess.run if fresh else run_python
    return runner([*command, *options], capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)


def test_a_tiny_run_prints_its_table_and_imports_nothing_of_the_release(tmp_path):
    result = run("--skip-baseline", wrapper=tmp_path / "wrapper.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| rankdetr " in result.stdout
    assert "imported detrex: False" in result.stdout
    # tools/benchmark_cpu_goals.py reads this table by its headers (its bf16 goal divides the
    # bf16 row's step by this row's).
    goals = load_tool(REPO_ROOT / "tools" / "benchmark_cpu_goals.py", "benchmark_cpu_goals")
    (row,) = goals.github_table(result.stdout, "variant")
    assert row["variant"] == "rankdetr" and goals.median_seconds(row["train step (s)"]) > 0


RELEASE = os.environ.get("RANKDETR_RELEASE_PATH")


@pytest.mark.skipif(not RELEASE, reason="RANKDETR_RELEASE_PATH names no release tree")
def test_side_by_side_with_the_release_on_tiny_sizes(tmp_path):
    deps = os.environ.get("RANKDETR_RELEASE_DEPS")
    options = ["--release-path", str(Path(RELEASE))]
    if deps:
        options += ["--release-deps", deps]
    # A fresh interpreter: the release's packages go on sys.path before anything is imported.
    result = run(*options, wrapper=tmp_path / "wrapper.py", fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("losses on the same"))
    assert float(line.split("of a term: ")[1].split(",")[0]) < 1e-5, line
    rows = [x.split("|") for x in result.stdout.splitlines() if x.startswith("| ")]
    assert [r[1].strip() for r in rows[1:]] == ["rankdetr", "original release"]
    assert rows[2][4].strip() == "1.00x"
