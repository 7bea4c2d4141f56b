"""The code style the project keeps (ruff, black, isort at 100 columns), checked with the tests."""

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["rankdetr", "tools", "tests", "configs", "setup.py"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "--no-cache"],
        ["black", "--check", "--quiet"],
        ["isort", "--check-only", "--quiet"],
    ],
    ids=["ruff", "black", "isort"],
)
def test_code_style(command):
    if shutil.which(command[0], path=str(Path(sys.executable).parent)) is None:
        pytest.skip(f"{command[0]} is not installed (pip install -e '.[dev]')")
    tool = str(Path(sys.executable).parent / command[0])
    result = subprocess.run([tool, *command[1:], *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert (
        result.returncode == 0
    ), f"`make format` fixes most of this:\n{result.stdout}{result.stderr}"


def test_the_formatters_are_pinned_and_installed_at_their_pins():
    """CI installs the dev extras (tools/setup_env.sh: `pip install -e ".[dev,onnx]"`); the style
    checks above must run with exactly the versions that formatted the code."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(spec.split("==") for spec in extras["optional-dependencies"]["dev"] if "==" in spec)
    assert sorted(pins) == ["black", "isort", "ruff"]
    assert {name: version(name) for name in pins} == pins
    assert '-e ".[dev,onnx]"' in (ROOT / "tools" / "setup_env.sh").read_text()
