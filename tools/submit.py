#!/usr/bin/env python
r"""Submit a tools/train_net.py run as a Slurm job (through submitit), preemption-safe.

    .venv/bin/python tools/submit.py --config-file configs/rank_detr/rank_detr_r50_12ep.py \
        --nodes 2 --gpus-per-node 8 --partition gpu train.init_checkpoint=/path/to/R-50.pkl

The flags of train_net.py (--config-file, --resume, --eval-only, key=value overrides) mean the
same here; --num-gpus comes from --gpus-per-node and the machine arguments from Slurm. The config
and overrides are checked before anything is submitted. The sbatch script and the logs go to
`<train.output_dir>/slurm/`. A job that is preempted or reaches its time limit is requeued and
resumes from its newest checkpoint (see rankdetr/engine/slurm.py). `--cluster local` runs the
same job as processes on this machine; `--wait` waits for the job and prints what it returns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from submitit.core.utils import UncompletedJobError

from rankdetr.engine.slurm import (
    add_slurm_arguments,
    slurm_options_from_args,
    submit_jobs,
    training_job,
)
from rankdetr.errors import report_user_errors

TRAIN_NET = Path(__file__).resolve().parent / "train_net.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    parser.add_argument("--eval-only", action="store_true", help="evaluate, do not train")
    parser.add_argument("--wait", action="store_true", help="wait for the job, print its results")
    add_slurm_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    options = slurm_options_from_args(args)
    job = training_job(TRAIN_NET, args.config_file, args.opts, options,
                       resume=args.resume, eval_only=args.eval_only)  # fmt: skip
    folder = Path(job.output_dir) / "slurm"
    (submitted,) = submit_jobs([job], options, folder, job_name=f"rankdetr-{_config_name(args)}")
    print(f"submitted job {submitted.job_id} ({options.cluster}: {options.nodes} node(s) x "
          f"{options.processes_per_node} process(es)); output {job.output_dir}, logs "
          f"{folder}")  # fmt: skip
    if not args.wait:
        return 0
    try:
        results = submitted.result()
    except UncompletedJobError as error:
        print(f"error: job {submitted.job_id} failed (logs in {folder}):\n{error}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    return 0


def _config_name(args: argparse.Namespace) -> str:
    return Path(args.config_file).stem


if __name__ == "__main__":
    sys.exit(report_user_errors(main, parse_args()))
