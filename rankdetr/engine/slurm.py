"""Training runs as Slurm jobs through submitit: options, submission, and the job itself.

A job runs tools/train_net.py's own `main` (parsed by its own parser) under detectron2's `launch`,
with ONE SUBMITIT TASK PER NODE: each task spawns one worker per GPU of its node, with
machine_rank = the node's rank and dist_url = tcp://<first node>:<port>. That is the multi-machine
mode detectron2's `launch` is written for (the same code path as `train_net.py --num-machines`),
so a job trains exactly as a run started by hand on each node would; one task per GPU would need
its own process-group set-up instead. The task process is submitit's, so it owns preemption:

- Slurm sends the job's processes USR2 `signal_delay_s` before the time limit (`#SBATCH
  --signal`), and on preemption. Task 0's submitit handler calls `TrainingJob.checkpoint`, which
  returns the same job with `--resume`; submitit requeues it, and the requeued run continues from
  the newest complete checkpoint in train.output_dir. The resume is exact (see do_train), so the
  run ends with the weights of an uninterrupted one; the iterations since that checkpoint are
  computed again. The spawned workers leave these signals to the task.
- A job that Slurm requeues by itself (SLURM_RESTART_COUNT > 0) resumes too.
- When the task trains in its own process (one node, one GPU), the DataLoader workers it forks
  inherit submitit's handlers; these act only in the task process.

Logs, the sbatch script and submitit's pickles go to `<train.output_dir>/slurm/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from detectron2.engine import launch
from submitit.helpers import Checkpointable, DelayedSubmission

from rankdetr.errors import UserError

__all__ = [
    "SlurmOptions",
    "SlurmOptionError",
    "Placement",
    "TrainingJob",
    "add_slurm_arguments",
    "slurm_options_from_args",
    "training_job",
    "make_executor",
    "submit_jobs",
    "placement_from_job_environment",
    "run_results",
    "write_job_record",
    "read_job_record",
    "job_is_active",
]

# Ports for the workers' rendezvous on the first node: base + job id % span, the same on every
# node without any exchange, and different for jobs that share a first node.
MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 10000
# Slurm job states of a job that has not ended (sacct's names).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "UNKNOWN"}  # fmt: skip
JOB_RECORD = "slurm_job.json"


class SlurmOptionError(UserError, ValueError):
    """A submission option or a job environment that cannot work."""


def _option(default, help: str, **argparse_kwargs):
    """A SlurmOptions field: its default, and its command-line flag's help."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SlurmOptions:
    """Where and with what a job runs. The one place for the defaults: every field is a flag
    (`gpus_per_node` -> `--gpus-per-node`) of tools/submit.py and tools/ablation_sweep.py."""

    cluster: str = _option("slurm", "submitit executor: slurm, or local to run the job as "
                           "processes on this machine (to try a submission)",
                           choices=("slurm", "local"))  # fmt: skip
    partition: str | None = _option(None, "Slurm partition (default: the cluster's)")
    nodes: int = _option(1, "nodes; one task per node spawns a worker per GPU")
    gpus_per_node: int = _option(8, "GPUs per node (0: one CPU worker per node)")
    cpus_per_gpu: int = _option(10, "CPUs per GPU (data loading); the task gets them all")
    mem_gb: int | None = _option(None, "memory per node in GB (default: 64 per GPU, 0: all)")
    time_min: int = _option(24 * 60, "time limit in minutes; the job is requeued at the limit")
    job_name: str | None = _option(None, "job name (default: rankdetr-<config name>)")
    constraint: str | None = _option(None, "Slurm --constraint (node features)")
    account: str | None = _option(None, "Slurm --account")
    qos: str | None = _option(None, "Slurm --qos")
    max_timeouts: int = _option(10, "how often a job may reach its time limit and be requeued")
    signal_delay_s: int = _option(120, "seconds before the time limit when the job is signalled")
    setup: list[str] = _option([], "shell line run before the job (repeatable), "
                               "e.g. 'module load cuda'", action="append")  # fmt: skip

    MEM_GB_PER_GPU = 64  # the default memory (class constant, not a flag)

    @property
    def processes_per_node(self) -> int:
        """train_net.py's --num-gpus: one worker per GPU, one on a CPU-only node."""
        return max(1, self.gpus_per_node)

    def check(self) -> None:
        """Refuse values that Slurm or the local executor would fail on later, naming the flag."""
        for name in ("nodes", "cpus_per_gpu", "time_min"):
            if getattr(self, name) < 1:
                raise SlurmOptionError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_timeouts", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise SlurmOptionError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise SlurmOptionError(f"--mem-gb must be >= 0, got {self.mem_gb}")
        if self.cluster == "local" and self.nodes != 1:
            raise SlurmOptionError(f"--cluster local runs on this machine: --nodes must be 1, "
                                   f"got {self.nodes}")  # fmt: skip
        if self.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise SlurmOptionError("--cluster slurm needs Slurm's sbatch and srun on PATH, and "
                                   "this machine has none (run on a login node, or use "
                                   "--cluster local to try the job here)")  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The SlurmOptions fields as flags of `parser`, in their own group, with their defaults."""
    group = parser.add_argument_group("cluster (submitit / Slurm)")
    for option in dataclasses.fields(SlurmOptions):
        kwargs = {"metavar": option.name.split("_")[-1].upper(), **option.metadata}
        if option.type in ("int", "int | None"):
            kwargs["type"] = int
        default = option.default_factory() if kwargs.get("action") == "append" else option.default
        kwargs["help"] += f" [{default}]" if default not in (None, []) else ""
        # append actions start from None: a default list would be extended, not replaced
        kwargs["default"] = None if kwargs.get("action") == "append" else default
        group.add_argument(_flag(option.name), dest=f"slurm_{option.name}", **kwargs)


def slurm_options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """SlurmOptions from the flags add_slurm_arguments added, checked."""
    values = {option.name: getattr(args, f"slurm_{option.name}")
              for option in dataclasses.fields(SlurmOptions)}  # fmt: skip
    values["setup"] = values["setup"] or []
    options = SlurmOptions(**values)
    options.check()
    return options


# --- inside the job -----------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """How this task's node joins the run: detectron2 launch's machine arguments."""

    num_machines: int
    machine_rank: int
    dist_url: str

    def argv(self) -> list[str]:
        return ["--num-machines", str(self.num_machines), "--machine-rank",
                str(self.machine_rank), "--dist-url", self.dist_url]  # fmt: skip


def placement_from_job_environment(env: submitit.JobEnvironment) -> Placement:
    """The node's rank and the first node's address from the job's environment (Slurm's
    SLURM_NODEID, SLURM_JOB_NUM_NODES, SLURM_NTASKS and SLURM_JOB_NODELIST, which submitit's
    JobEnvironment expands like `scontrol show hostnames`)."""
    if env.num_tasks != env.num_nodes:
        raise SlurmOptionError(
            f"a rankdetr job runs one task per node (each spawns its node's GPU workers), but "
            f"this job has {env.num_tasks} tasks on {env.num_nodes} nodes: submit it with "
            f"--ntasks-per-node=1 (tools/submit.py does)"
        )
    if env.num_nodes == 1:
        return Placement(1, 0, "auto")  # detectron2 picks a free local port
    port = MASTER_PORT_BASE + int(env.raw_job_id) % MASTER_PORT_SPAN
    return Placement(env.num_nodes, env.node, f"tcp://{env.hostnames[0]}:{port}")


def requeued_by_slurm() -> bool:
    """True in a job that Slurm requeued by itself (preemption with PreemptMode=REQUEUE, node
    failure): the submitted arguments are the first attempt's, but the run must resume."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def import_script(path: str | Path):
    """A tools/ script imported by its own name, with its folder at the end of sys.path: the
    workers detectron2's launch spawns get this sys.path and so unpickle its `main` by name."""
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(Path(path).stem)


def _ignore_preemption_signals() -> None:
    """Slurm signals every process of the job; in a spawned worker the preemption signal and
    SIGTERM are ignored, as submitit's own task process ignores SIGTERM: task 0 checkpoints and
    requeues the job, and the workers end with it."""
    signal.signal(_preemption_signal(), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run_main(main, args: argparse.Namespace) -> None:
    """What launch runs in each worker: the script's main, after the signal set-up."""
    if multiprocessing.parent_process() is not None:  # spawned by launch, not the task itself
        _ignore_preemption_signals()
    main(args)


def _confine_signal_handlers_to_this_process() -> None:
    """Make submitit's handlers (preemption signal, SIGTERM) act in this process only. A process
    forked from it (a DataLoader worker when the task trains in-process) inherits the Python
    handlers, and would otherwise checkpoint and requeue the job from inside the worker."""
    task_pid = os.getpid()
    for signum in (_preemption_signal(), signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, _only_in(task_pid, handler))


def _only_in(pid: int, handler):
    def handle(signum, frame):
        if os.getpid() == pid:
            handler(signum, frame)

    return handle


def _preemption_signal() -> signal.Signals:
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def _stop_workers() -> None:
    """Kill the workers launch spawned (they ignore SIGTERM), so that the task can exit to be
    requeued; their checkpoints are written atomically, so a kill leaves the last one whole."""
    for child in multiprocessing.active_children():
        child.kill()


def run_results(output_dir: str | Path) -> dict:
    """What a job hands back: the output folder, the final weights (None if absent), the last
    iteration logged and the last evaluation's metrics (`bbox/AP` -> `AP`), from metrics.json."""
    output_dir = Path(output_dir)
    iteration, metrics = None, {}
    metrics_file = output_dir / "metrics.json"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            iteration = record.get("iteration", iteration)
            bbox = {key[5:]: value for key, value in record.items() if key.startswith("bbox/")}
            metrics = bbox or metrics
    final = output_dir / "model_final.pth"
    return {"output_dir": str(output_dir), "model_final": str(final) if final.is_file() else None,
            "iteration": iteration, "metrics": metrics}  # fmt: skip


class TrainingJob(Checkpointable):
    """tools/train_net.py's main as a submitit job: `flags` are train_net.py's flags (config,
    --num-gpus per node, --resume), `overrides` its key=value overrides; the machine flags are
    added in the job from Slurm's environment. Returns run_results(output_dir)."""

    def __init__(self, script: str | Path, flags: list[str], overrides: list[str],
                 output_dir: str | Path) -> None:  # fmt: skip
        self.script = str(script)
        self.flags = list(flags)
        self.overrides = list(overrides)
        self.output_dir = str(output_dir)
        self._spawns_workers = False  # set in the job: whether launch spawned worker processes

    def __call__(self) -> dict:
        placement = placement_from_job_environment(submitit.JobEnvironment())
        flags = [*self.flags, *placement.argv()]
        if requeued_by_slurm() and "--resume" not in flags:
            flags.append("--resume")
        train_net = import_script(self.script)
        args = train_net.parse_args([*flags, *self.overrides])  # overrides come last
        # world size 1 trains in this process; otherwise launch spawns the workers
        self._spawns_workers = args.num_gpus * args.num_machines > 1
        _confine_signal_handlers_to_this_process()
        launch(_run_main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url,
               args=(train_net.main, args))  # fmt: skip
        return run_results(self.output_dir)

    def resumed(self) -> TrainingJob:
        """The same job, continuing from the newest checkpoint in its output folder."""
        flags = self.flags if "--resume" in self.flags else [*self.flags, "--resume"]
        return type(self)(self.script, flags, self.overrides, self.output_dir)

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit in task 0 on preemption or at the time limit: the job to requeue.
        The trainer's periodic checkpoints are the state; nothing is saved here."""
        if self._spawns_workers:  # not the DataLoader workers of an in-process run
            _stop_workers()
        return DelayedSubmission(self.resumed())


# --- submitting ---------------------------------------------------------------------------


def training_job(script: str | Path, config_file: str, overrides: list[str],
                 options: SlurmOptions, resume: bool = False,
                 eval_only: bool = False) -> TrainingJob:  # fmt: skip
    """A TrainingJob for `script` (tools/train_net.py) with this config and overrides, checked
    now (a bad key fails at submission, not hours later in the queue). Paths are made absolute
    and train.output_dir is pinned, so the job writes where its slurm/ folder is."""
    from rankdetr.engine.runner import load_config  # the config stack only where one is read

    cfg = load_config(config_file, overrides)
    output_dir = Path(cfg.train.output_dir).resolve()
    flags = ["--config-file", str(Path(config_file).resolve()),
             "--num-gpus", str(options.processes_per_node)]  # fmt: skip
    flags += ["--resume"] * resume + ["--eval-only"] * eval_only
    overrides = [item for item in overrides if not item.startswith("train.output_dir=")]
    return TrainingJob(script, flags, [*overrides, f"train.output_dir={output_dir}"], output_dir)


def _executor_parameters(options: SlurmOptions, job_name: str) -> dict:
    """submitit AutoExecutor parameters: the generic ones, and slurm_* (ignored locally)."""
    gpus = options.gpus_per_node
    mem_gb = options.MEM_GB_PER_GPU * max(gpus, 1) if options.mem_gb is None else options.mem_gb
    threads = max(1, options.cpus_per_gpu)
    return {
        "name": job_name,
        "nodes": options.nodes,
        "tasks_per_node": 1,
        "gpus_per_node": gpus or None,
        "cpus_per_task": options.cpus_per_gpu * options.processes_per_node,
        "mem_gb": mem_gb,
        "timeout_min": options.time_min,
        "slurm_partition": options.partition,
        "slurm_constraint": options.constraint,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_signal_delay_s": options.signal_delay_s,
        # the workers share the task's CPUs: without this each would start a thread per CPU
        "slurm_setup": [f"export OMP_NUM_THREADS={threads}", *options.setup],
        # scontrol requeue (submitit's requeue) needs a requeueable job
        "slurm_additional_parameters": {"requeue": True},
    }


def make_executor(options: SlurmOptions, folder: str | Path,
                  job_name: str = "rankdetr") -> submitit.AutoExecutor:  # fmt: skip
    """submitit's executor for options.cluster, writing into `folder`."""
    options.check()
    Path(folder).mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(
        folder=folder, cluster=options.cluster, slurm_max_num_timeout=options.max_timeouts,
        local_max_num_timeout=options.max_timeouts,
    )  # fmt: skip
    executor.update_parameters(**_executor_parameters(options, options.job_name or job_name))
    return executor


def submit_jobs(jobs: list[TrainingJob], options: SlurmOptions, folder: str | Path,
                job_name: str = "rankdetr") -> list[submitit.Job]:  # fmt: skip
    """Submit the jobs in one go: one job, or a Slurm job array (local: one process each)."""
    executor = make_executor(options, folder, job_name)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    return submitted


# --- bookkeeping of submitted runs (sweeps) -----------------------------------------------


def write_job_record(run_dir: str | Path, job: submitit.Job, cluster: str) -> None:
    """Note in the run's folder which job trains it, so that a later sweep does not submit it
    again while that job is queued or running."""
    record = {"cluster": cluster, "job_id": str(job.job_id), "folder": str(job.paths.folder)}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / JOB_RECORD).write_text(json.dumps(record) + "\n")


def read_job_record(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / JOB_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def job_is_active(record: dict) -> bool:
    """Whether the recorded job is queued or running: Slurm's state from sacct (an unknown
    state counts as active, so nothing is submitted twice), or for a local job whether its
    controller process is alive."""
    if record["cluster"] == "local":
        return _process_alive(int(record["job_id"]))
    state = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"]).state
    return state.split()[0].upper() in ACTIVE_STATES


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    # a finished child of this process that nobody reaped yet is a zombie, not alive
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")
