#!/usr/bin/env python
"""Run the RCH / QRL / GCL / HMC grid of Table 4 for a config and tabulate it like the paper.

    .venv/bin/python tools/ablation_sweep.py --config-file configs/demo/rank_detr_r18_shapes.py \
        --tables a b c --output-dir output/sweep -- train.max_iter=300

Each distinct flag combination of the chosen sub-tables trains once (tools/train_net.py in its own
process, with `model.rank.*` overrides and the extra overrides after `--`) into
`<output-dir>/<flags>/`; a combination whose run already finished is not trained again. The
tables (AP, AR and oLRP columns as in the paper; "—" where a run lacks a metric) are printed and
written to `<output-dir>/table4.md`.

With `--launcher slurm` (and the cluster flags of tools/submit.py: --nodes, --gpus-per-node,
--partition, ...) every run still to train is submitted through submitit, all of them as one
Slurm job array, and the sweep returns at once, printing the job ids (`--wait` waits for them).
Logs go to `<output-dir>/slurm/`; each run notes its job in `<run>/slurm_job.json`. Running the
sweep again tabulates the finished runs, leaves queued and running ones alone, and resubmits
only the runs that are missing or whose job ended without results (resuming from their newest
checkpoint). `--cluster local` runs those jobs as processes on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from rankdetr.engine import slurm
from rankdetr.errors import report_user_errors

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


def rank_overrides(flags: tuple[int, ...]) -> list[str]:
    """(1, 0, 1, 0) -> ["model.rank.rch=True", "model.rank.qrl=False", ...]: the one config node
    every model (Rank-DETR on H-DETR or on DINO) takes its four components from."""
    return [f"model.rank.{name}={bool(on)}" for name, on in zip(FLAGS, flags)]


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
    overrides = rank_overrides(flags)
    command = [sys.executable, str(TRAIN_NET), "--config-file", config_file, *overrides,
               f"train.output_dir={output_dir}", *extra]  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "sweep_stdout.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def submit(config_file: str, runs: dict[tuple[int, ...], Path], extra: list[str],
           options: slurm.SlurmOptions, folder: Path) -> dict[tuple[int, ...], object]:  # fmt: skip
    """Submit the runs (flags -> output folder) as one submitit job array; returns their jobs.
    A job resumes its folder's newest checkpoint (a failed job's retry continues it)."""
    jobs = {}
    for flags, output_dir in runs.items():
        overrides = rank_overrides(flags)
        jobs[flags] = slurm.training_job(TRAIN_NET, config_file,
                                         [*overrides, f"train.output_dir={output_dir}", *extra],
                                         options, resume=True)  # fmt: skip
    submitted = slurm.submit_jobs(list(jobs.values()), options, folder, job_name="rankdetr-sweep")
    for output_dir, job in zip(runs.values(), submitted):
        slurm.write_job_record(output_dir, job, options.cluster)
    return dict(zip(runs, submitted))


def still_running(output_dir: Path) -> str | None:
    """The id of the job noted in the run's folder if it is still queued or running."""
    record = slurm.read_job_record(output_dir)
    return record["job_id"] if record and slurm.job_is_active(record) else None


def train_on_cluster(args, pending: list[tuple[int, ...]]) -> None:
    """--launcher slurm: submit what has no active job, in one array; with --wait, wait."""
    runs = {}
    for flags in pending:
        output_dir = args.output_dir / run_name(flags)
        job_id = still_running(output_dir)
        if job_id is not None:
            print(f"{run_name(flags)}: job {job_id} is still queued or running, not resubmitted")
        else:
            runs[flags] = output_dir
    if not runs:
        return
    if args.dry_run:
        print("would submit: " + " ".join(run_name(flags) for flags in runs))
        return
    jobs = submit(args.config_file, runs, args.overrides, args.slurm_options,
                  args.output_dir / "slurm")  # fmt: skip
    for flags, job in jobs.items():
        print(f"submitted {run_name(flags)}: job {job.job_id} -> {runs[flags]}")
    if args.wait:
        for flags, job in jobs.items():
            if job.exception() is not None:  # waits for the job
                print(f"{run_name(flags)}: job {job.job_id} failed, see {job.paths.stderr}")


def format_table(key: str, results: dict[tuple[int, ...], dict]) -> str:
    """One sub-table of Table 4 in the paper's layout (check marks, then the metrics), as a
    markdown table."""
    title, rows = TABLES[key]
    cells = [
        ["✓" if on else "✗" for on in flags]
        + [_cell((results.get(flags) or {}).get(m)) for m in METRICS]
        for flags in rows
    ]
    table = tabulate(cells, ("RCH", "QRL", "GCL", "HMC", *METRICS), tablefmt="github",
                     disable_numparse=True)  # fmt: skip
    return f"({key}) {title}\n\n{table}"


def _cell(value) -> str:
    return "—" if value is None or value != value else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=["a", "b", "c"])
    parser.add_argument("--output-dir", type=Path, default=Path("output/ablation_sweep"))
    parser.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: train here, one run after another; slurm: submit the runs "
                        "as a job array through submitit and return")  # fmt: skip
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the submitted jobs")
    slurm.add_slurm_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides (after --)")
    args = parser.parse_args()
    if args.launcher == "slurm":
        args.slurm_options = slurm.slurm_options_from_args(args)

    combos = list(dict.fromkeys(flags for key in args.tables for flags in TABLES[key][1]))
    results = {flags: final_metrics(args.output_dir / run_name(flags)) for flags in combos}
    pending = [flags for flags in combos if results[flags] is None]
    if args.launcher == "slurm":
        train_on_cluster(args, pending)
    elif not args.dry_run:
        for flags in tqdm(pending, desc="ablation runs", unit="run"):
            output_dir = args.output_dir / run_name(flags)
            tqdm.write(f"training {run_name(flags)} -> {output_dir}")
            train(args.config_file, flags, output_dir, args.overrides)
    results = {flags: final_metrics(args.output_dir / run_name(flags)) for flags in combos}
    tables = "\n\n".join(format_table(key, results) for key in args.tables)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "table4.md").write_text(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
