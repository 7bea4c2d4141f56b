#!/usr/bin/env python
"""Issue 25's CPU goals, measured on this machine, in one table beside their targets.

Each goal runs as the command a person would type, in its own process, one after the other
(they would disturb each other's timings), with its output in a log file per goal. Every 30 s
the tool prints how long the running command has taken and its last line. At the end it prints
the machine (CPU model, family and model, native bf16, torch's CPU capability, what
``train.amp.dtype="auto"`` picks), the VM's speed before and after (a float32 matmul's GFLOP/s:
a shared VM drifts by up to ~1.5x within an hour) and a table: goal, measured, target, met.
Markdown, so that it goes into the README or an issue note as it is (``--output``).

| goal | command | target |
|---|---|---|
| coco_eval | tools/benchmark_coco_eval.py (5000 images) | >= 3x pycocotools, identical numbers |
| bf16 | tools/benchmark_train_step.py --skip-baseline --amp bf16 | bf16 step <= 0.5x float32 |
| release | tools/benchmark_train_step.py --release-path ... | float32 step <= 0.45x the release |
| demo | tools/train_net.py --config-file configs/demo/rank_detr_r18_shapes.py | <= 4 min, AP>=50 |
| suite | make test | pytest <= 6 min |

By default every goal runs that applies here: ``bf16`` only on a CPU with native bf16 (elsewhere
``auto`` trains in float32, so the goal is not this CPU's), ``release`` only with
``--release-path``. Goals named with ``--goals`` run in any case. Smaller runs for a quick look
(``--coco-images``, ``--size tiny``, ``--demo-overrides``) are measured but not judged.

    .venv/bin/python tools/benchmark_cpu_goals.py               # ~25 min on 2 cores
    .venv/bin/python tools/benchmark_cpu_goals.py --goals demo suite --output goals.md
    .venv/bin/python tools/benchmark_cpu_goals.py --release-path /tmp/release \\
        --release-deps /tmp/release_deps
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
DEMO_CONFIG = "configs/demo/rank_detr_r18_shapes.py"
HEARTBEAT_SECONDS = 30.0


# --- reading the commands' outputs ---------------------------------------------------------


def github_table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the last GitHub-style table in `text` whose first column is `first_header`,
    as {header: cell} dicts (tabulate's ``tablefmt="github"``, as our benchmark tools print)."""
    found: list[dict[str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line)
        if not cells or cells[0] != first_header or i + 1 >= len(lines):
            continue
        if not set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            continue  # not a header row
        rows = []
        for row_line in lines[i + 2 :]:
            row = _cells(row_line)
            if row is None:
                break
            rows.append(dict(zip(cells, row)))
        found = rows
    return found


def _cells(line: str) -> list[str] | None:
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return None
    return [cell.strip() for cell in line[1:-1].split("|")]


def ratio(cell: str) -> float:
    """ "0.48x" or "3.1x" -> 0.48 / 3.1."""
    return float(cell.strip().rstrip("x"))


def median_seconds(cell: str) -> float:
    """ "6.35 (5.64-6.87)" or "6.35" -> 6.35 (the median the tools print first)."""
    return float(cell.split()[0])


def pytest_summary(text: str) -> tuple[dict[str, int], float] | None:
    """The counts ({"passed": 919, "skipped": 24, ...}) and seconds of pytest's last summary
    line ("==== 919 passed, 24 skipped in 443.12s (0:07:23) ====", without the rules under
    -q), or None."""
    for line in reversed(text.splitlines()):
        match = re.fullmatch(r"=* ?(\d+ \w+.*) in ([\d.]+)s( \([\d:]+\))?( =+)?", line.strip())
        if match:
            counts = {
                word: int(number) for number, word in re.findall(r"(\d+) (\w+)", match.group(1))
            }
            return counts, float(match.group(2))
    return None


def training_speed(text: str) -> tuple[int, float] | None:
    """(iterations, s/it) of detectron2's last "Overall training speed: 1100 iterations in
    0:03:42 (0.2018 s / it)" log line, or None."""
    pattern = r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)"
    found = re.findall(pattern, text)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def final_ap(output_dir: Path) -> float | None:
    """The last bbox AP written to output_dir/metrics.json, read as tools/ablation_sweep.py
    reads a finished run's results."""
    sys.path.insert(0, str(TOOLS))
    try:
        from ablation_sweep import final_metrics
    finally:
        sys.path.remove(str(TOOLS))
    metrics = final_metrics(output_dir)
    return None if metrics is None else metrics["AP"]


# --- the goals -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a goal's run measured: the text for the table and whether it met the target (None:
    not judged, the reason in `note`)."""

    measured: str
    met: bool | None
    note: str = ""


@dataclass
class Goal:
    """One row of the table: the command that measures it and how its output is read."""

    name: str
    target: str
    command: Callable[[argparse.Namespace, Path], list[str]]
    read: Callable[[str, float, Path], Outcome]
    not_here: Callable[[argparse.Namespace], str | None] = lambda args: None
    """Why the goal is not run by default on this machine (None: it is)."""
    reduced: Callable[[argparse.Namespace], bool] = lambda args: False
    """Whether the options shrink the run below the goal's size (then it is not judged)."""


def _python(script: str, *options: str) -> list[str]:
    return [sys.executable, str(TOOLS / script), *options]


def _coco_command(args, workdir):
    return _python("benchmark_coco_eval.py", "--images", str(args.coco_images))


def _read_coco(text, seconds, workdir):
    total = next((r for r in github_table(text, "stage") if r["stage"] == "total"), None)
    identical = re.search(r"identical \(all <= [^)]*\): (yes|NO)", text)
    if total is None or identical is None:
        return Outcome("no table in the output", False)
    speedup = ratio(total["speed-up"])
    same = identical.group(1) == "yes"
    measured = (f"{speedup:.1f}x ({total['pycocotools COCOeval (s)']} s -> "
                f"{total['FastCOCOeval (s)']} s), identical: {identical.group(1)}")  # fmt: skip
    return Outcome(measured, speedup >= 3.0 and same)


def _bf16_command(args, workdir):
    return _python("benchmark_train_step.py", "--skip-baseline", "--amp", "bf16",
                   "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--size", args.size)  # fmt: skip


def _read_bf16(text, seconds, workdir):
    rows = {r["variant"]: r for r in github_table(text, "variant")}
    plain, bf16 = rows.get("rankdetr"), rows.get("rankdetr, bf16 autocast")
    if plain is None or bf16 is None:
        return Outcome("no table in the output", False)
    fp32_s = median_seconds(plain["train step (s)"])
    bf16_s = median_seconds(bf16["train step (s)"])
    value = bf16_s / fp32_s
    measured = f"{value:.2f}x ({fp32_s:.2f} s float32 -> {bf16_s:.2f} s bf16 per step)"
    if not _native_bf16():
        return Outcome(measured, None, "no native bf16 here: `auto` trains float32")
    return Outcome(measured, value <= 0.5)


def _release_command(args, workdir):
    options = ["--release-path", str(args.release_path), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--size", args.size]  # fmt: skip
    if args.release_deps:
        options += ["--release-deps", str(args.release_deps)]
    return _python("benchmark_train_step.py", *options)


def _read_release(text, seconds, workdir):
    rows = {r["model"]: r for r in github_table(text, "model")}
    ours = rows.get("rankdetr")
    if ours is None:
        return Outcome("no table in the output", False)
    value = ratio(ours["train / release"])
    measured = (f"{value:.2f}x ({ours['train step (s)']} s against "
                f"{rows['original release']['train step (s)']} s)")  # fmt: skip
    return Outcome(measured, value <= 0.45)


def _demo_command(args, workdir):
    return _python("train_net.py", "--config-file", str(ROOT / DEMO_CONFIG),
                   f"train.output_dir={workdir / 'demo'}", *args.demo_overrides)  # fmt: skip


def _read_demo(text, seconds, workdir):
    ap = final_ap(workdir / "demo")
    speed = training_speed(text)
    if ap is None:
        return Outcome(f"{_minutes(seconds)} all in, no AP written", False)
    per_step = f", {speed[0]} iterations at {speed[1]:.3f} s/it" if speed else ""
    measured = f"{_minutes(seconds)} all in{per_step}, AP {ap:.1f}"
    return Outcome(measured, seconds <= 240.0 and ap >= 50.0)


def _suite_command(args, workdir):
    return ["make", "-C", str(ROOT), "test"]


def _read_suite(text, seconds, workdir):
    summary = pytest_summary(text)
    if summary is None:
        return Outcome(f"{_minutes(seconds)}, no pytest summary", False)
    counts, pytest_seconds = summary
    tally = ", ".join(f"{n} {word}" for word, n in counts.items())
    measured = f"pytest {_minutes(pytest_seconds)} ({tally}); make test {_minutes(seconds)}"
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return Outcome(measured, pytest_seconds <= 360.0 and not failed)


def _minutes(seconds: float) -> str:
    """119.6 -> "2 min 0 s" (rounded to the second first)."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


GOALS = [
    Goal("coco_eval", ">= 3x pycocotools' COCOeval, identical numbers", _coco_command,
         _read_coco, reduced=lambda a: a.coco_images != 5000),
    Goal("bf16", "bf16 step <= 0.5x our float32 step (R50)", _bf16_command, _read_bf16,
         not_here=lambda a: None if _native_bf16() else "no native bf16 (auto: float32)",
         reduced=lambda a: a.size != "r50"),
    Goal("release", "float32 step <= 0.45x the release's (R50)", _release_command,
         _read_release, not_here=lambda a: None if a.release_path else "no --release-path",
         reduced=lambda a: a.size != "r50"),
    Goal("demo", "<= 4 min of training and evaluation, AP >= 50", _demo_command, _read_demo,
         reduced=lambda a: bool(a.demo_overrides)),
    Goal("suite", "pytest <= 6 min (make test)", _suite_command, _read_suite),
]  # fmt: skip


# --- the machine ---------------------------------------------------------------------------


def _native_bf16() -> bool:
    from rankdetr.engine.precision import cpu_bf16_features

    return bool(cpu_bf16_features())


def matmul_gflops(threads: int = 2, rounds: int = 5, seconds: float = 0.2) -> float:
    """This VM's speed now: the median GFLOP/s of a (3000, 128) x (128, 512) float32 matmul on
    `threads` threads over `rounds` rounds of ~`seconds` each. A shared VM's speed drifts by up
    to ~1.5x within an hour; the probe before and after the goals says at which speed they ran."""
    import statistics

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(3000, 128), torch.randn(128, 512)
        flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        for _ in range(5):
            a @ b
        rates = []
        for _ in range(rounds):
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                a @ b
                count += 1
            rates.append(flop * count / elapsed / 1e9)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(previous)


def machine_line() -> str:
    """CPU model, family / model, cores, native bf16, torch's CPU capability, `auto`'s choice."""
    import torch

    from rankdetr.engine.precision import choose_amp_dtype, cpu_bf16_features

    fields = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    name = fields.get("Model name", "unknown CPU")
    family = f"family {fields.get('CPU family', '?')} model {fields.get('Model', '?')}"
    bf16 = ", ".join(cpu_bf16_features()) or "none"
    capability = torch.backends.cpu.get_cpu_capability()
    auto = choose_amp_dtype("auto", "cpu").dtype or "float32"
    cores = len(os.sched_getaffinity(0))
    return (
        f"{name} ({family}), {cores} cores; native bf16: {bf16}; "
        f"torch {torch.__version__}, CPU capability {capability}; auto trains {auto}"
    )


# --- running -------------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, label: str) -> tuple[str, float, int]:
    """Run `command` from the repository root, its stdout and stderr into `log`; every
    HEARTBEAT_SECONDS print the time taken so far and its last line. Returns (output, seconds,
    exit status)."""
    heartbeat = HEARTBEAT_SECONDS
    start = time.perf_counter()
    lines: list[str] = []
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        )  # fmt: skip

        def pump():
            for line in process.stdout:
                lines.append(line)
                sink.write(line)
                sink.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(heartbeat)
            if reader.is_alive():
                last = next((x.strip()[:100] for x in reversed(lines) if x.strip()), "")
                print(f"  {label}: {time.perf_counter() - start:.0f} s | {last}", flush=True)
        status = process.wait()
    return "".join(lines), time.perf_counter() - start, status


def selected_goals(args) -> list[tuple[Goal, str | None]]:
    """(goal, why it is skipped or None) in GOALS order."""
    chosen = []
    for goal in GOALS:
        if args.goals:
            chosen.append((goal, None if goal.name in args.goals else "not in --goals"))
        else:
            chosen.append((goal, goal.not_here(args)))
    return chosen


def result_table(results: list[tuple[Goal, Outcome | None, str]]) -> str:
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for goal, outcome, skipped in results:
        if outcome is None:
            lines.append(f"| {goal.name} | not run: {skipped} | {goal.target} | — |")
            continue
        met = {True: "yes", False: "**no**", None: "not judged"}[outcome.met]
        if outcome.note:
            met += f" ({outcome.note})"
        lines.append(f"| {goal.name} | {outcome.measured} | {goal.target} | {met} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--goals",
        nargs="+",
        choices=[g.name for g in GOALS],
        help="run these (default: every goal that applies on this machine)",
    )
    parser.add_argument("--release-path", type=Path, help="the original release's tree")
    parser.add_argument("--release-deps", type=Path, help="its extra packages (pip --target)")
    parser.add_argument("--threads", type=int, default=2, help="train-step benchmarks (2)")
    parser.add_argument("--repeats", type=int, default=5, help="train-step benchmarks (5)")
    parser.add_argument(
        "--size",
        choices=["r50", "tiny"],
        default="r50",
        help="train-step model; tiny is not judged",
    )
    parser.add_argument(
        "--coco-images",
        type=int,
        default=5000,
        help="images of the COCO benchmark (5000; fewer are not judged)",
    )
    parser.add_argument(
        "--demo-overrides",
        nargs="*",
        default=[],
        help="config overrides for the demo run (then it is not judged)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="logs and the demo's output " "(default output/cpu_goals/<time>)",
    )
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)  # fmt: skip
    if args.goals and "release" in args.goals and args.release_path is None:
        parser.error("the release goal needs --release-path (the original release's tree)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.log_dir or ROOT / "output" / "cpu_goals" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    probe_before = matmul_gflops(args.threads)
    print(f"machine: {machine}\nlogs: {log_dir}", flush=True)
    print(f"speed probe (float32 matmul, {args.threads} threads): {probe_before:.0f} GFLOP/s")
    results = []
    for goal, skipped in selected_goals(args):
        if skipped:
            results.append((goal, None, skipped))
            continue
        command = goal.command(args, log_dir)
        started = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{goal.name}] {started} {' '.join(command)}", flush=True)
        text, seconds, status = run_logged(command, log_dir / f"{goal.name}.log", goal.name)
        outcome = goal.read(text, seconds, log_dir)
        if status != 0:
            outcome = Outcome(f"exit status {status} after {_minutes(seconds)} (see the log)",
                              False)  # fmt: skip
        elif goal.reduced(args) and outcome.met is not None:
            outcome = Outcome(outcome.measured, None, "smaller than the goal's run")
        print(f"[{goal.name}] {outcome.measured}", flush=True)
        results.append((goal, outcome, ""))
    probe_after = matmul_gflops(args.threads)
    probe = (f"Speed probe (a (3000, 128) x (128, 512) float32 matmul on {args.threads} threads): "
             f"{probe_before:.0f} GFLOP/s before the goals, {probe_after:.0f} after")  # fmt: skip
    report = f"Machine: {machine}\n\n{probe}\n\n{result_table(results)}\n"
    print("\n" + report)
    if args.output:
        args.output.write_text(report)
    ran = [outcome for _, outcome, _ in results if outcome is not None]
    return 0 if all(outcome.met is not False for outcome in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
