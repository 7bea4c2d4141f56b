"""Each Table 4 / 5a / 5b / varifocal config holds the values its file name and docstring say."""

import ast
import re
from pathlib import Path

import pytest
from detectron2.config import LazyConfig, instantiate

ABLATIONS = Path(__file__).resolve().parents[2] / "configs" / "ablations"
FLAGS = ("rch", "qrl", "gcl", "hmc")


def rank_options(path: Path):
    return instantiate(LazyConfig.load(str(path)).model.rank)


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text()))


def number(token: str) -> float:
    return float(token.replace("p", "."))


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("table4_*.py")), ids=lambda p: p.stem)
def test_table4_flags_match_name_and_docstring(path):
    named = set(path.stem.removeprefix("table4_").split("_")) - {"none"}
    assert named <= set(FLAGS)
    rank = rank_options(path)
    assert {flag for flag in FLAGS if getattr(rank, flag)} == named
    said = dict(re.findall(r"(RCH|QRL|GCL|HMC)=(True|False)", docstring(path)))
    if path.stem == "table4_none":
        assert "no rank component" in docstring(path)
    else:
        assert {k.lower() for k, v in said.items() if v == "True"} == named
        assert len(said) == 4
    # The other options keep the paper's values.
    assert (rank.hmc_power, rank.hmc_quality, rank.gcl_target, rank.gcl_power) == (
        4.0,
        "iou",
        "giou",
        1.0,
    )


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("table5a_*.py")), ids=lambda p: p.stem)
def test_table5a_gcl_target_and_power(path):
    _, target, power = path.stem.split("_")
    rank = rank_options(path)
    assert (rank.gcl_target, rank.gcl_power) == (target, number(power))
    assert rank.rch and rank.qrl and rank.gcl and rank.hmc and not rank.varifocal
    written = "IoU" if target == "iou" else "((GIoU + 1) / 2)"
    assert f"t = {written}^{power.replace('p', '.')} " in docstring(path)


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("table5b_*.py")), ids=lambda p: p.stem)
def test_table5b_hmc_quality_and_power(path):
    _, quality, power = path.stem.split("_")
    rank = rank_options(path)
    assert (rank.hmc_quality, rank.hmc_power) == (quality, number(power))
    assert rank.rch and rank.qrl and rank.gcl and rank.hmc
    assert (rank.gcl_target, rank.gcl_power) == ("giou", 1.0)
    written = "IoU" if quality == "iou" else "((GIoU + 1) / 2)"
    assert f"p[c] * {written}^{power} " in docstring(path)


def test_varifocal_config():
    path = ABLATIONS / "varifocal.py"
    rank = rank_options(path)
    assert rank.varifocal and not rank.gcl and not rank.hmc and rank.gcl_target == "iou"
    assert rank.classification_loss == "varifocal"
    assert "varifocal" in docstring(path) and "t = IoU" in docstring(path)
