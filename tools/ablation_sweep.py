#!/usr/bin/env python
"""Run the RCH / QRL / GCL / HMC grid of Table 4 for a config and tabulate it like the paper.

    .venv/bin/python tools/ablation_sweep.py --config-file configs/demo/rank_detr_r18_shapes.py \
        --tables a b c --output-dir output/sweep -- train.max_iter=300

Each distinct flag combination of the chosen sub-tables trains once (tools/train_net.py in its own
process, with `model.rank.*` overrides and the extra overrides after `--`) into
`<output-dir>/<flags>/`; a combination whose run already finished is not trained again. The
tables (AP, AR and oLRP columns as in the paper; "—" where a run lacks a metric) are printed and
written to `<output-dir>/table4.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

FLAGS = ("rch", "qrl", "gcl", "hmc")
# Rows of Table 4 as (RCH, QRL, GCL, HMC).
TABLES = {
    "a": ("Effect of gradually adding modules on the baseline",
          [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 1, 1)]),
    "b": ("Effect of incorporating each module on the baseline",
          [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]),
    "c": ("Effect of removing each module in our method",
          [(1, 1, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]),
}  # fmt: skip
# The paper's columns, as RankDETRCOCOEvaluator writes them to metrics.json ("bbox/<name>").
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
           "oLRP", "oLRP_Loc", "oLRP_FP", "oLRP_FN")  # fmt: skip
TRAIN_NET = Path(__file__).resolve().parent / "train_net.py"


def run_name(flags: tuple[int, ...]) -> str:
    """(1, 1, 0, 0) -> "rch_qrl"; all off -> "none"."""
    return "_".join(name for name, on in zip(FLAGS, flags) if on) or "none"


def final_metrics(output_dir: Path) -> dict | None:
    """The last COCO bbox results written to output_dir/metrics.json, or None. A metric the run
    did not record (AR and oLRP in runs from before they were evaluated) is None."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    latest = None
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "bbox/AP" in record:
            latest = {m: record.get(f"bbox/{m}") for m in METRICS}
    return latest


def train(config_file: str, flags: tuple[int, ...], output_dir: Path, extra: list[str]) -> None:
    overrides = [f"model.rank.{name}={bool(on)}" for name, on in zip(FLAGS, flags)]
    command = [sys.executable, str(TRAIN_NET), "--config-file", config_file, *overrides,
               f"train.output_dir={output_dir}", *extra]  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "sweep_stdout.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def format_table(key: str, results: dict[tuple[int, ...], dict]) -> str:
    """One sub-table of Table 4 in the paper's layout (check marks, then the metrics)."""
    title, rows = TABLES[key]
    lines = [f"({key}) {title}", "",
             "| RCH | QRL | GCL | HMC | " + " | ".join(METRICS) + " |",
             "|" + "---|" * (4 + len(METRICS))]  # fmt: skip
    for flags in rows:
        marks = " | ".join("✓" if on else "✗" for on in flags)
        values = results.get(flags) or {}
        cells = " | ".join(_cell(values.get(m)) for m in METRICS)
        lines.append(f"| {marks} | {cells} |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "—" if value is None or value != value else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=["a", "b", "c"])
    parser.add_argument("--output-dir", type=Path, default=Path("output/ablation_sweep"))
    parser.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides (after --)")
    args = parser.parse_args()

    combos = list(dict.fromkeys(flags for key in args.tables for flags in TABLES[key][1]))
    results = {}
    for flags in tqdm(combos, desc="ablation runs", unit="run"):
        output_dir = args.output_dir / run_name(flags)
        results[flags] = final_metrics(output_dir)
        if results[flags] is None and not args.dry_run:
            tqdm.write(f"training {run_name(flags)} -> {output_dir}")
            train(args.config_file, flags, output_dir, args.overrides)
            results[flags] = final_metrics(output_dir)
    tables = "\n\n".join(format_table(key, results) for key in args.tables)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "table4.md").write_text(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
