"""Bad configuration: missing files, unknown keys, values of the wrong type, bad syntax."""

import math
import re
import runpy
import sys
from pathlib import Path

import pytest

from rankdetr.engine.optim import step_lr_schedule
from rankdetr.engine.runner import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")

CONFIG = """
train = dict(
    max_iter=100,
    lr=0.5,
    optional=None,
    clip=0.1,
    enabled=True,
    name="run",
    sizes=(128, 160),
    scales=[0.5, 1.0],
    flags=[True, False],
    mixed=[1, "a"],
    nested=dict(period=5, keep=2),
    follows="${.max_iter}",
)
"""


@pytest.fixture
def config_file(tmp_path) -> str:
    path = tmp_path / "small.py"
    path.write_text(CONFIG)
    return str(path)


def test_missing_config_file_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing_dir/nope.py"):
        load_config(str(tmp_path / "missing_dir" / "nope.py"), [])


def test_unknown_key_is_named_with_close_matches(config_file):
    with pytest.raises(ConfigError, match=r"no key 'train.max_itr'.*close matches: train.max_iter"):
        load_config(config_file, ["train.max_itr=5"])
    with pytest.raises(ConfigError, match=r"no key 'train.nested.perod'.*train.nested.period"):
        load_config(config_file, ["train.nested.perod=5"])
    with pytest.raises(ConfigError, match=r"no key 'train.sizes.5'"):
        load_config(config_file, ["train.sizes.5=1"])
    with pytest.raises(
        ConfigError, match=r"no key 'nothing_like_this' \(from override 'nothing_like_this=1'\)$"
    ):
        load_config(config_file, ["nothing_like_this=1"])


def test_unknown_key_in_the_demo_config(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.rank.qlr'.*close matches: model.rank.qrl"):
        load_config(DEMO, ["model.rank.qlr=False"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_iter=abc", "train.max_iter expects an int, got 'abc'"),
        ("train.max_iter=5.0", "train.max_iter expects an int, got '5.0'"),
        ("train.max_iter=true", "train.max_iter expects an int, got 'true'"),
        ("train.max_iter=[5]", r"train.max_iter expects an int, got '\[5\]'"),
        ("train.lr=fast", "train.lr expects a float, got 'fast'"),
        ("train.lr=false", "train.lr expects a float, got 'false'"),
        ("train.enabled=1", r"train.enabled expects a bool \(true or false\), got '1'"),
        ("train.enabled=yes", r"train.enabled expects a bool \(true or false\), got 'yes'"),
        ("train.enabled=null", r"train.enabled expects a bool \(true or false\), got 'null'"),
        ("train.name=[a,b]", "train.name expects a str, got"),
        ("train.sizes=128", r"train.sizes expects a list, e.g. \[1,2\], got '128'"),
        ("train.sizes=[128,big]", r"train.sizes expects a list of int \(element 'big' is not\)"),
        ("train.sizes=null", "train.sizes expects a list"),
        ("train.flags=[true,0]", r"train.flags expects a list of bool \(element 0 is not\)"),
        ("train.nested=5", r"train.nested expects a dict, e.g. \{a:1\}, got '5'"),
        ("train.follows=abc", "train.follows expects an int, got 'abc'"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(config_file, override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config_file, [override])
    assert f"(from override '{override}')" in str(error.value)


def test_values_that_fit_are_applied(config_file):
    cfg = load_config(
        config_file,
        [
            "train.max_iter=7",
            "train.lr=1",  # an int for a float key: stored as a float
            "train.clip=null",  # None means "off" for int / float / str keys
            "train.optional=bf16",  # the default is None: anything goes
            "train.enabled=false",
            "train.name=123",  # a number for a str key: the text typed
            "train.sizes=[96,112,128]",
            "train.scales=[1,2.5]",
            "train.mixed=[x,2,3.5]",  # a mixed default: elements not checked
            "train.nested={period:9}",
            "train.follows=3",
        ],
    )
    train = cfg.train
    assert train.max_iter == 7 and train.lr == 1.0 and isinstance(train.lr, float)
    assert train.clip is None and train.optional == "bf16" and train.enabled is False
    assert train.name == "123" and isinstance(train.name, str)
    assert list(train.sizes) == [96, 112, 128] and list(train.scales) == [1, 2.5]
    assert train.nested.period == 9 and train.nested.keep == 2 and train.follows == 3


def test_a_float_key_keeps_its_text_free_parse(config_file):
    cfg = load_config(config_file, ["train.lr=1e-4", "train.name=1e-4"])
    assert math.isclose(cfg.train.lr, 1e-4) and cfg.train.name == "1e-4"


def test_syntax_errors_name_their_override(config_file):
    with pytest.raises(ConfigError, match=r"cannot apply override 'train.sizes=\[1,'"):
        load_config(config_file, ["train.sizes=[1,"])
    with pytest.raises(ConfigError, match="override 'train.max_iter' is not of the form key=value"):
        load_config(config_file, ["train.max_iter"])
    with pytest.raises(ConfigError, match=r"cannot apply override '~train.lr'"):
        load_config(config_file, ["~train.lr"])


def test_demo_config_types(tmp_path):
    with pytest.raises(ConfigError, match="model.rank.qrl expects a bool"):
        load_config(DEMO, ["model.rank.qrl=0"])
    cfg = load_config(DEMO, ["train.max_iter=7", "optimizer.lr=1", "train.amp.dtype=fp16"])
    assert cfg.train.max_iter == 7 and cfg.optimizer.lr == 1.0 and cfg.train.amp.dtype == "fp16"
    assert cfg.lr_multiplier.max_iter == 7  # the interpolation follows the override


def test_train_net_prints_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    # The script's __main__ block, run in this process (a subprocess would import torch again).
    argv = ["train_net.py", "--config-file", DEMO, f"train.output_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv + ["train.max_iter=abc"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "tools" / "train_net.py"), run_name="__main__")
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: train.max_iter expects an int, got 'abc' (from override 'train.max_iter=abc')"
    ]
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_iter=null", "train.max_iter must be an integer >= 1, got None"),
        ("train.max_iter=-5", "train.max_iter must be an integer >= 1, got -5"),
        ("train.max_iter=0", "train.max_iter must be an integer >= 1, got 0"),
        ("train.checkpointer.period=0", "train.checkpointer.period must be an integer >= 1"),
        ("train.eval_period=-1", "train.eval_period must be an integer >= 0"),
        ("train.log_period=0", "train.log_period must be an integer >= 1"),
    ],
)
def test_out_of_range_train_values_are_one_config_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DEMO, [override])


def test_a_key_given_twice_is_checked_with_its_last_override():
    with pytest.raises(ConfigError, match=r"from override 'train.max_iter=abc'"):
        load_config(DEMO, ["train.max_iter=5", "train.max_iter=abc"])
    cfg = load_config(DEMO, ["train.max_iter=abc", "train.max_iter=7"])
    assert cfg.train.max_iter == 7


def test_a_one_iteration_run_has_a_constant_learning_rate():
    schedule = step_lr_schedule(max_iter=1)
    assert schedule(0.0) == 1.0 and schedule(0.99) == 1.0
    assert schedule(1.0) == 1.0  # detectron2's LR hook asks once more after the last step


@pytest.mark.parametrize("value", ["None", "null"])
def test_only_the_evaluator_node_may_be_turned_off_with_none(value):
    assert load_config(DEMO, [f"dataloader.evaluator={value}"]).dataloader.evaluator is None
    with pytest.raises(ConfigError, match=r"dataloader.test expects a dict"):
        load_config(DEMO, [f"dataloader.test={value}"])
    with pytest.raises(ConfigError, match=r"dataloader.evaluator expects a dict"):
        load_config(DEMO, ["dataloader.evaluator=5"])
