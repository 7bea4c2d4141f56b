#!/usr/bin/env python
"""One command that says whether this machine's GPU path is right, and how fast it is.

    .venv/bin/python tools/gpu_selftest.py            # or: make gpu-check
    .venv/bin/python tools/gpu_selftest.py --quick    # fewer repeats and iterations

On a CUDA machine: the CUDA op against the float64 reference (float64/32/16, bfloat16, also
non-contiguous inputs) and against the CPU op, gradcheck in float64 on the GPU, the op's speed
against the pure-PyTorch reference, 30 training iterations of the R50 config at 800x1333 in fp32
and bf16 autocast (finite losses, s/it, peak memory), inference FPS, and a few DDP iterations of
the demo config over all visible GPUs (NCCL). Without a GPU it runs the same checks on the CPU,
trains the demo model instead, and lists what it skipped. One table; the exit status is 1 when
any correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from rankdetr.selftest import Row, run_all

ROOT = Path(__file__).resolve().parents[1]


def ddp_rows(quick: bool) -> list[Row]:
    """A few iterations of the demo config on every visible GPU (NCCL), through train_net."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return [Row("ddp", "NCCL over all GPUs", "skipped", "needs a GPU")]
    output = ROOT / "output" / "gpu_selftest_ddp"
    command = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file",
               str(ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"), "--num-gpus", str(count),
               "train.device=cuda", f"train.max_iter={3 if quick else 10}", "train.eval_period=0",
               f"train.output_dir={output}", "dataloader.train.num_workers=0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    status = "ok" if result.returncode == 0 else "FAIL"
    return [Row("ddp", f"NCCL over {count} GPU(s)", status, tail[0][-120:])]


def print_table(rows: list[Row]) -> None:
    cells = [(row.section, row.check, row.status, row.detail) for row in rows]
    headers = ("section", "check", "status", "detail")
    print(tabulate(cells, headers, tablefmt="github", disable_numparse=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and iterations")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_selftest: --device cuda but torch sees no GPU", file=sys.stderr)
        return 1
    rows = run_all(device, quick=args.quick)
    rows += ddp_rows(args.quick)
    if device == "cpu":
        rows.insert(0, Row("cuda", "GPU checks", "skipped", "torch sees no GPU: CPU checks only"))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"\nrankdetr self-test: torch {torch.__version__}, GPU {gpu}, "
          f"{torch.get_num_threads()} CPU threads, pid {os.getpid()}\n")  # fmt: skip
    print_table(rows)
    failed = [row for row in rows if row.status == "FAIL"]
    print(f"\n{len(failed)} failed, {sum(r.status == 'ok' for r in rows)} ok, "
          f"{sum(r.status == 'skipped' for r in rows)} skipped")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
