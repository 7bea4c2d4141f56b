#!/usr/bin/env python
"""Time COCO box evaluation at COCO scale: pycocotools' COCOeval vs rankdetr's FastCOCOeval.

Both evaluate the same synthetic COCO-sized data (tools/make_synthetic_coco.py: 5000 images,
~35k boxes, 100 detections per image) in this process, one after the other: evaluate(),
accumulate(), summarize() and the evaluator's AR and oLRP metrics
(rankdetr.evaluation.ranking_metrics). Loading the files (COCO() and loadRes(), shared by both)
is timed apart. It prints a table of seconds and ratios with the CPU model, then checks that
every number is the same: the 12 COCO stats, COCOeval.eval's precision, recall and scores
arrays, the AR and oLRP metrics, oLRP's components and per-class values (exit status 1 if any
differs by more than 1e-12).

    .venv/bin/python tools/benchmark_coco_eval.py                    # 5000 images, ~3 min
    .venv/bin/python tools/benchmark_coco_eval.py --images 500
    .venv/bin/python tools/benchmark_coco_eval.py --data-dir /tmp/synthetic_coco  # files of
        # tools/make_synthetic_coco.py --output-dir /tmp/synthetic_coco
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate


def _load_sibling(name: str):
    """A script of tools/ (not a package) as a module: make_synthetic_coco writes the data."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic = _load_sibling("make_synthetic_coco")
logger = logging.getLogger("benchmark_coco_eval")
TOLERANCE = 1e-12
STAGES = ("evaluate", "accumulate", "summarize", "AR + oLRP")


def cpu_model() -> str:
    """lscpu's "Model name" and the number of cores this process may use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def run(cls, coco_gt, coco_dt, label: str):
    """Evaluate with COCOeval class `cls`: (seconds per stage, COCOeval, ranking metrics)."""
    from rankdetr.evaluation import ranking_metrics
    from rankdetr.evaluation.olrp import olrp_from_coco_eval

    coco_eval = cls(coco_gt, coco_dt, "bbox")
    seconds = {}
    steps = {
        "evaluate": coco_eval.evaluate,
        "accumulate": coco_eval.accumulate,
        "summarize": coco_eval.summarize,
        "AR + oLRP": lambda: ranking_metrics(coco_eval),
    }
    metrics = None
    for stage, step in steps.items():
        logger.info("%s: %s ...", label, stage)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            result = step()
        seconds[stage] = time.perf_counter() - start
        metrics = result if stage == "AR + oLRP" else metrics
        logger.info("%s: %s took %.2f s", label, stage, seconds[stage])
    olrp = olrp_from_coco_eval(coco_eval)  # again, for the per-class values (not timed)
    return seconds, coco_eval, metrics, olrp


def differences(baseline, fast) -> dict[str, float]:
    """Max abs difference per group of numbers (equal infinities and NaN in both count as equal,
    NaN in one as inf)."""
    (_, e0, m0, o0), (_, e1, m1, o1) = baseline, fast

    def max_diff(a, b) -> float:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return math.inf
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):  # inf - inf of equal infinities (masked)
            diff = np.where(same, 0.0, np.abs(a - b))
        return float(np.nan_to_num(diff, nan=math.inf).max(initial=0.0))

    per_class = sorted(o0.per_class)
    fields = ("olrp", "loc", "fp", "fn", "threshold")
    return {
        "12 COCO stats": max_diff(e0.stats, e1.stats),
        "eval precision/recall/scores": max(max_diff(e0.eval[k], e1.eval[k])
                                            for k in ("precision", "recall", "scores")),
        "AR and oLRP metrics (%)": max_diff([m0[k] for k in m0], [m1.get(k) for k in m0]),
        "oLRP, Loc, FP, FN": max_diff([getattr(o0, f) for f in fields[:4]],
                                      [getattr(o1, f) for f in fields[:4]]),
        "per-class oLRP (all fields)": (
            max_diff([[getattr(o0.per_class[c], f) for f in fields] for c in per_class],
                     [[getattr(o1.per_class[c], f) for f in fields] for c in per_class])
            if per_class == sorted(o1.per_class) else math.inf
        ),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help=f"{synthetic.GT_FILE} and "
                        f"{synthetic.DT_FILE} from "
                        "tools/make_synthetic_coco.py (default: generate them)")  # fmt: skip
    parser.add_argument("--images", type=int, default=5000, help="images to generate (5000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from rankdetr.evaluation import FastCOCOeval

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        if data_dir is None:
            logger.info("writing %d synthetic images (seed %d) ...", args.images, args.seed)
            data_dir = Path(scratch)
            synthetic.write_synthetic_coco(data_dir, args.images, args.seed)
        logger.info("loading %s ...", data_dir)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(data_dir / synthetic.GT_FILE))
            coco_dt = coco_gt.loadRes(json.loads((data_dir / synthetic.DT_FILE).read_text()))
        load_seconds = time.perf_counter() - start

    baseline = run(COCOeval, coco_gt, coco_dt, "pycocotools")
    fast = run(FastCOCOeval, coco_gt, coco_dt, "FastCOCOeval")

    rows = []
    for stage in (*STAGES, "total"):
        if stage == "total":
            t0, t1 = sum(baseline[0].values()), sum(fast[0].values())
        else:
            t0, t1 = baseline[0][stage], fast[0][stage]
        rows.append([stage, f"{t0:.2f}", f"{t1:.2f}", f"{t0 / t1:.1f}x" if t1 > 0 else "-"])
    print(f"\n{len(coco_gt.imgs)} images, {len(coco_gt.anns)} boxes, {len(coco_dt.anns)} "
          f"detections; CPU: {cpu_model()}; loading (COCO + loadRes, shared, not in the table) "
          f"{load_seconds:.1f} s")  # fmt: skip
    headers = ["stage", "pycocotools COCOeval (s)", "FastCOCOeval (s)", "speed-up"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))

    diffs = differences(baseline, fast)
    print("\nmax |pycocotools - FastCOCOeval|:")
    print(tabulate([[k, f"{v:.3g}"] for k, v in diffs.items()], headers=["numbers", "max diff"],
                   tablefmt="github", disable_numparse=True))  # fmt: skip
    worst = max(diffs.values())
    print(f"identical (all <= {TOLERANCE:g}): {'yes' if worst <= TOLERANCE else 'NO'}"
          f"{' (bit for bit)' if worst == 0 else ''}")  # fmt: skip
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
