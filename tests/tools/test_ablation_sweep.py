"""tools/ablation_sweep.py: the grid of Table 4 and the table it writes (runs faked)."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "ablation_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    return load_tool(TOOL, "ablation_sweep")


def test_table4_rows_are_the_papers(sweep):
    assert sweep.TABLES["a"][1][-1] == (1, 1, 1, 1) and sweep.TABLES["b"][1][2] == (0, 1, 0, 0)
    distinct = {flags for key in "abc" for flags in sweep.TABLES[key][1]}
    assert len(distinct) == 11  # 15 rows, some shared between sub-tables
    assert sweep.run_name((1, 0, 1, 0)) == "rch_gcl" and sweep.run_name((0, 0, 0, 0)) == "none"


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the markdown tables in `markdown` (header rows included,
    separator rows left out)."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def write_metrics(output_dir, record):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(
        json.dumps({"iteration": 9}) + "\n" + json.dumps(record) + "\n"
    )


def test_table_has_the_papers_columns(sweep):
    assert sweep.METRICS == ("AP", "AP50", "AP75", "APs", "APm", "APl",
                             "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
                             "oLRP", "oLRP_Loc", "oLRP_FP", "oLRP_FN")  # fmt: skip


def test_runs_are_trained_once_and_tabulated(sweep, tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(config_file, flags, output_dir, extra):
        trained.append((flags, extra))
        write_metrics(output_dir, {f"bbox/{m}": 10.0 * sum(flags) + i
                                   for i, m in enumerate(sweep.METRICS)})  # fmt: skip

    # A baseline run from before AR and oLRP were evaluated: reused, its missing columns "—".
    old_metrics = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    write_metrics(tmp_path / "none", {f"bbox/{m}": float(i) for i, m in enumerate(old_metrics)})
    monkeypatch.setattr(sweep, "train", fake_train)
    argv = ["ablation_sweep.py", "--config-file", "cfg.py", "--tables", "a", "c",
            "--output-dir", str(tmp_path), "train.max_iter=5"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    assert sweep.main() == 0
    # (a) and (c) share the full model and the model without HMC: 8 distinct runs, 1 done already.
    assert len(trained) == 7 and all(extra == ["train.max_iter=5"] for _, extra in trained)
    assert (0, 0, 0, 0) not in [flags for flags, _ in trained]
    table = (tmp_path / "table4.md").read_text()
    rows = table_rows(table)
    assert rows[0] == ["RCH", "QRL", "GCL", "HMC", *sweep.METRICS]
    assert ["✓"] * 4 + [f"{40.0 + i:.1f}" for i in range(16)] in rows
    assert ["✗"] * 4 + [f"{i:.1f}" for i in range(6)] + ["—"] * 10 in rows
    assert "(c) Effect of removing" in table
    # A second sweep finds every run finished and trains nothing.
    trained.clear()
    assert sweep.main() == 0 and trained == []
    assert "(a) Effect of gradually adding" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config", ["demo/dino_r18_shapes.py", "rank_dino/rank_dino_r50_4scale_12ep.py"]
)
def test_the_sweep_overrides_switch_the_components_of_dino_configs(sweep, config):
    """Every row of Table 4 applied to a DINO config through the runner's override checks gives
    a model whose four components are those of the row."""
    from detectron2.config import LazyConfig, instantiate

    from rankdetr.engine.config_checks import apply_checked_overrides

    path = Path(__file__).resolve().parents[2] / "configs" / config
    for flags in {flags for key in "abc" for flags in sweep.TABLES[key][1]}:
        cfg = apply_checked_overrides(LazyConfig.load(str(path)), sweep.rank_overrides(flags))
        rank = instantiate(cfg.model.rank)
        assert (rank.rch, rank.qrl, rank.gcl, rank.hmc) == tuple(map(bool, flags))
