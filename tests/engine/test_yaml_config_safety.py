"""A .yaml config is data: no entry point runs code from it.

detectron2's LazyConfig.load reads YAML with `yaml.unsafe_load`, so a tag such as
`!!python/object/apply:os.system` runs a command while the file is read, and a plain string
`_target_: subprocess.call` runs one when the config is instantiated. Each malicious file here
would create a marker file: train_net.py, a figure command's `--model NAME CFG CKPT` and the
Predictor must refuse it in one line naming the file, and the marker must never appear. The
config.yaml that a run of ours writes (detectron2's LazyConfig.save) still loads, without
PyYAML's unsafe loaders, and gives back the run's config, model and weights.
"""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from rankdetr.data import register_shapes_dataset
from rankdetr.engine.runner import ConfigError, build_model, load_config
from tests.conftest import REPO_ROOT
from tests.test_predictor import DEMO_CONFIG, TINY_OVERRIDES

# A run that trains for one iteration in a few seconds on the CPU.
ONE_ITERATION = [
    *TINY_OVERRIDES,
    "train.max_iter=1",
    "train.eval_period=0",
    "dataloader.evaluator=None",  # no evaluation: not what this checks
    "train.checkpointer.period=1",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
]


def touch_command(marker: Path) -> str:
    """A shell command creating `marker`, as a YAML (JSON) string."""
    return json.dumps(f"touch '{marker}'")


# Each payload creates the marker when PyYAML's unsafe loader reads it.
TAG_PAYLOADS = {
    "apply-in-train": "train: !!python/object/apply:os.system [{command}]\n",
    "nested-in-a-list": (
        "model:\n  layers:\n  - 1\n"
        "  - !!python/object/apply:subprocess.call [[sh, -c, {command}]]\n"
    ),
}


@pytest.fixture(params=sorted(TAG_PAYLOADS))
def evil_yaml(request, tmp_path):
    """A .yaml config holding a Python tag that would run `touch marker`; after the test, the
    marker must not exist."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.yaml"
    path.write_text(TAG_PAYLOADS[request.param].format(command=touch_command(marker)))
    yield path, marker
    assert not marker.exists(), f"reading {path.name} ran code from it"


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    """A file where a checkpoint is expected: the config is refused before it is read."""
    path = tmp_path / "model.pth"
    path.write_bytes(b"not read")
    return path


def run_script(monkeypatch, script: str, *args: str) -> int:
    """tools/<script>'s __main__ block in this process (a subprocess would import torch
    again); its exit status."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO_ROOT / "tools" / script), run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def assert_one_line_naming(text: str, path: Path, *names: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert str(path) in lines[0] and all(name in lines[0] for name in names), lines[0]


# --- Python tags: refused while the file is read, at every entry point -----------------------


def test_train_net_refuses_a_python_tag(evil_yaml, monkeypatch, capsys, tmp_path):
    path, _ = evil_yaml
    status = run_script(monkeypatch, "train_net.py", "--config-file", str(path),
                        f"train.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert status == 1
    assert_one_line_naming(capsys.readouterr().err, path, "!!python/object/apply:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["plot_pr_curves.py", "visualize_layer_boxes.py"])
def test_a_figure_command_refuses_a_python_tag(
    evil_yaml, checkpoint_file, monkeypatch, capsys, tool
):
    path, _ = evil_yaml
    output = path.parent / "figure.png"
    status = run_script(monkeypatch, tool, "--model", "A", str(path), str(checkpoint_file),
                        "--output", str(output))  # fmt: skip
    assert status == 1
    assert_one_line_naming(capsys.readouterr().err, path, "!!python/object/apply:")
    assert not output.exists()


def test_the_predictor_refuses_a_python_tag(evil_yaml, checkpoint_file):
    from rankdetr import Predictor

    path, _ = evil_yaml
    with pytest.raises(ConfigError) as error:
        Predictor(str(path), str(checkpoint_file))
    assert_one_line_naming(str(error.value), path, "line ", "!!python/object/apply:")


@pytest.mark.parametrize(
    "value,tag",
    [
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!!python/module:os ''", "!!python/module:os"),
        ("!!python/object/new:collections.OrderedDict []", "!!python/object/new:"),
        ("!!python/tuple [1, 2]", "!!python/tuple"),
        ("!custom 1", "!custom"),
    ],
)
def test_every_tag_beyond_plain_data_is_refused_with_its_line(tmp_path, value, tag):
    path = tmp_path / "tagged.yml"
    path.write_text(f"train:\n  max_iter: 1\n  extra: {value}\n")
    with pytest.raises(ConfigError, match="line 3: refused the YAML tag") as error:
        load_config(str(path), [])
    assert_one_line_naming(str(error.value), path, tag)


def test_an_object_lazyconfig_save_cannot_write_as_data_is_refused(tmp_path):
    """LazyConfig.save dumps an object it cannot name as data (here a class outside `_target_`)
    with a Python tag, and a pickle beside it: neither is loaded."""
    cfg = load_config(DEMO_CONFIG, [])
    cfg.model.backbone.activation = torch.nn.ReLU  # not a `_target_`: kept as the class
    saved = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(saved))
    assert "!!python/name:torch.nn" in saved.read_text()
    with pytest.raises(ConfigError) as error:
        load_config(str(saved), [])
    assert_one_line_naming(str(error.value), saved, "!!python/name:torch.nn")
    pickled = tmp_path / "config.yaml.pkl"  # what LazyConfig.save writes when YAML fails
    pickled.write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"a config is a \.py, \.yaml or \.yml file"):
        load_config(str(pickled), [])


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_iter: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(str(path), [])
    assert_one_line_naming(str(error.value), path, "line ")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a mapping of config nodes"):
        load_config(str(path), [])


# --- `_target_` names: a plain string that instantiate would call ----------------------------


def demo_yaml_with_test_mapper_target(tmp_path, target: str, marker: Path) -> Path:
    """The demo config as its saved config.yaml, the test mapper replaced by os.system (under
    the name `target`) called with a command creating `marker` (the Predictor builds the test
    mapper first)."""
    data = yaml.safe_load(save_config(load_config(DEMO_CONFIG, []), tmp_path / "demo.yaml"))
    command = json.loads(touch_command(marker))
    data["dataloader"]["test"]["mapper"] = {"_target_": target, "command": command}
    path = tmp_path / "evil_target.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("target", ["os.system", "rankdetr.engine.runner.os.system"])
def test_a_target_outside_the_allowed_modules_is_refused(tmp_path, checkpoint_file, target):
    """Also when the name reaches the callable through an allowed module's imports."""
    from rankdetr import Predictor

    marker = tmp_path / "code_ran"
    path = demo_yaml_with_test_mapper_target(tmp_path, target, marker)
    with pytest.raises(ConfigError) as error:
        Predictor(str(path), str(checkpoint_file))
    assert_one_line_naming(str(error.value), path, f"dataloader.test.mapper._target_={target!r}")
    assert not marker.exists(), f"instantiating {path.name} ran code from it"


# --- the config.yaml of our own runs ---------------------------------------------------------


def save_config(cfg: DictConfig, path: Path) -> str:
    LazyConfig.save(cfg, str(path))
    return path.read_text()


@pytest.fixture
def yaml_read_as_data(monkeypatch):
    """detectron2's LazyConfig.load (PyYAML's unsafe loader) fails for a .yaml file: a config
    that still loads was read through our plain-data path. (.py configs load as before, and
    LazyConfig.save keeps its own check of what it wrote.)"""
    load_python = LazyConfig.load

    def load(filename, *args, **kwargs):
        if not str(filename).endswith(".py"):
            raise AssertionError(f"{filename} read with a YAML loader that can run code")
        return load_python(filename, *args, **kwargs)

    monkeypatch.setattr(LazyConfig, "load", staticmethod(load))


def assert_same_config(saved, original, key: str = "cfg") -> None:
    """Equal trees, where a saved `_target_` (a dotted name) names the original's callable."""
    if isinstance(original, (DictConfig, ListConfig)):
        original = OmegaConf.to_container(original, resolve=False)
    if isinstance(saved, (DictConfig, ListConfig)):
        saved = OmegaConf.to_container(saved, resolve=False)
    if isinstance(original, dict):
        assert isinstance(saved, dict) and saved.keys() == original.keys(), key
        for name in original:
            if name == "_target_" and callable(original[name]):
                assert locate(saved[name]) is original[name], f"{key}._target_"
            else:
                assert_same_config(saved[name], original[name], f"{key}.{name}")
    elif isinstance(original, list):
        assert isinstance(saved, list) and len(saved) == len(original), key
        for index, (saved_item, item) in enumerate(zip(saved, original)):
            assert_same_config(saved_item, item, f"{key}.{index}")
    else:
        assert saved == original and type(saved) is type(original), key


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_demo_config_saved_by_lazyconfig_loads_as_the_same_config(
    tmp_path, monkeypatch, yaml_read_as_data
):
    original = load_config(DEMO_CONFIG, TINY_OVERRIDES)
    saved = tmp_path / "config.yaml"
    save_config(original, saved)
    monkeypatch.setattr(yaml, "unsafe_load", lambda *args, **kwargs: pytest.fail("unsafe load"))
    loaded = load_config(str(saved), [])
    assert_same_config(loaded, original)
    assert loaded.lr_multiplier.max_iter == original.lr_multiplier.max_iter  # interpolations
    torch.manual_seed(0)
    model_from_yaml = build_model(loaded)
    torch.manual_seed(0)
    model_from_py = build_model(original)
    assert type(model_from_yaml) is type(model_from_py)
    assert same_weights(model_from_yaml.state_dict(), model_from_py.state_dict())


def test_a_runs_config_yaml_reproduces_the_run(
    tmp_path, monkeypatch, isolated_catalogs, yaml_read_as_data
):
    """train_net.py writes config.yaml into train.output_dir; that file, read as plain data,
    is the run's config, and training again from it gives the same weights."""
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 2, "val": 2})
    run_1, run_2 = tmp_path / "run_1", tmp_path / "run_2"
    run_1_overrides = [*ONE_ITERATION, f"train.output_dir={run_1}"]
    assert run_script(monkeypatch, "train_net.py", "--config-file", DEMO_CONFIG,
                      *run_1_overrides) == 0  # fmt: skip
    saved = run_1 / "config.yaml"
    assert_same_config(load_config(str(saved), []), load_config(DEMO_CONFIG, run_1_overrides))
    assert run_script(monkeypatch, "train_net.py", "--config-file", str(saved),
                      f"train.output_dir={run_2}") == 0  # fmt: skip
    weights = [torch.load(run / "model_final.pth", weights_only=True)["model"]
               for run in (run_1, run_2)]  # fmt: skip
    assert same_weights(*weights)
