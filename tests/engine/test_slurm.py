"""rankdetr.engine.slurm without running training: what a task of a multi-node Slurm job hands to
detectron2's launch (from Slurm's environment variables), option checks, and the bookkeeping
that keeps a sweep from submitting a run twice."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankdetr.engine import slurm
from rankdetr.engine.slurm import SlurmOptionError, SlurmOptions
from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


def slurm_task_environment(monkeypatch, nodes=2, node=1, tasks=2, **extra):
    """The variables Slurm sets in a task of job 734512 on nodes gpu-st-011 and gpu-st-014."""
    variables = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "734512",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(tasks),
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu-st-[011,014]",
        **extra,
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def launched(monkeypatch):
    """detectron2's launch replaced by a recorder: what the job would start."""
    calls = []
    monkeypatch.setattr(slurm, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def demo_job(tmp_path, gpus_per_node=8):
    options = SlurmOptions(cluster="local", gpus_per_node=gpus_per_node)
    return slurm.training_job(TRAIN_NET, str(DEMO), ["train.max_iter=3",
                              f"train.output_dir={tmp_path}"], options)  # fmt: skip


def test_the_second_node_of_a_two_node_job_launches_its_eight_workers(
    tmp_path, monkeypatch, launched
):
    slurm_task_environment(monkeypatch)
    assert demo_job(tmp_path)() == slurm.run_results(tmp_path)  # nothing trained: empty results
    ((main_func, num_gpus), kwargs), = launched  # fmt: skip
    assert main_func is slurm._run_main and num_gpus == 8
    port = slurm.MASTER_PORT_BASE + 734512 % slurm.MASTER_PORT_SPAN
    assert kwargs["num_machines"] == 2 and kwargs["machine_rank"] == 1
    assert kwargs["dist_url"] == f"tcp://gpu-st-011:{port}"  # the first node of the list
    train_main, args = kwargs["args"]
    assert train_main.__module__ == "train_net" and train_main.__name__ == "main"
    assert (args.config_file, args.num_gpus, args.resume) == (str(DEMO), 8, False)
    assert args.opts == ["train.max_iter=3", f"train.output_dir={tmp_path}"]


def test_a_job_that_slurm_requeued_itself_resumes(tmp_path, monkeypatch, launched):
    slurm_task_environment(monkeypatch, nodes=1, node=0, tasks=1, SLURM_RESTART_COUNT="1")
    demo_job(tmp_path)()
    (_, kwargs), = launched  # fmt: skip
    assert kwargs["args"][1].resume is True
    assert kwargs["num_machines"] == 1 and kwargs["dist_url"] == "auto"


def test_the_requeued_job_of_a_checkpoint_resumes(tmp_path, monkeypatch):
    job = demo_job(tmp_path)
    requeued = job.checkpoint().function
    assert type(requeued) is type(job) and requeued.overrides == job.overrides
    assert requeued.flags == [*job.flags, "--resume"]
    assert requeued.resumed().flags == requeued.flags  # once


def test_one_task_per_gpu_is_refused_with_the_reason(tmp_path, monkeypatch, launched):
    slurm_task_environment(monkeypatch, tasks=16)
    with pytest.raises(SlurmOptionError, match="16 tasks on 2 nodes.*--ntasks-per-node=1"):
        demo_job(tmp_path)()
    assert launched == []


def test_cpu_only_jobs_run_one_worker_per_node(tmp_path):
    assert demo_job(tmp_path, gpus_per_node=0).flags[-2:] == ["--num-gpus", "1"]


def parse_options(*argv):
    parser = argparse.ArgumentParser()
    slurm.add_slurm_arguments(parser)
    return slurm.slurm_options_from_args(parser.parse_args(argv))


def test_flags_default_to_the_dataclass_and_are_checked(monkeypatch):
    assert parse_options("--cluster", "local") == SlurmOptions(cluster="local")
    options = parse_options("--cluster", "local", "--gpus-per-node", "4", "--setup", "a",
                            "--setup", "b", "--mem-gb", "100")  # fmt: skip
    assert (options.gpus_per_node, options.setup, options.mem_gb) == (4, ["a", "b"], 100)
    with pytest.raises(SlurmOptionError, match="--nodes must be 1, got 2"):
        parse_options("--cluster", "local", "--nodes", "2")
    with pytest.raises(SlurmOptionError, match="--time-min must be >= 1, got 0"):
        parse_options("--cluster", "local", "--time-min", "0")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SlurmOptionError, match="needs Slurm's sbatch.*--cluster local"):
        parse_options()


def test_submit_refuses_a_bad_override_before_submitting(tmp_path):
    submit = load_tool(ROOT / "tools" / "submit.py", "submit")
    args = submit.parse_args(["--cluster", "local", "--config-file", str(DEMO),
                              f"train.output_dir={tmp_path}", "train.max_itr=2"])  # fmt: skip
    with pytest.raises(Exception, match="train.max_itr.*train.max_iter"):
        submit.main(args)
    assert not (tmp_path / "slurm").exists()


def test_a_local_job_is_active_while_its_process_lives(tmp_path):
    assert slurm.job_is_active({"cluster": "local", "job_id": str(os.getpid())})
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{finished.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        time.sleep(0.01)  # until it has exited, not reaped yet: a zombie
    assert not slurm.job_is_active({"cluster": "local", "job_id": str(finished.pid)})
    finished.wait()
    assert not slurm.job_is_active({"cluster": "local", "job_id": str(finished.pid)})


def record_job(run_dir, pid):
    run_dir.mkdir()
    record = {"cluster": "local", "job_id": str(pid), "folder": str(run_dir.parent / "slurm")}
    (run_dir / slurm.JOB_RECORD).write_text(json.dumps(record))


def test_a_sweep_leaves_running_jobs_alone_and_resubmits_failed_ones(tmp_path, monkeypatch, capsys):
    """Dry run of a sweep over table (b): `none` has a live job, `rch` a job that ended without
    results, `qrl` finished; the other two never ran."""
    sweep = load_tool(ROOT / "tools" / "ablation_sweep.py", "ablation_sweep")
    record_job(tmp_path / "none", os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    record_job(tmp_path / "rch", ended.pid)
    (tmp_path / "qrl").mkdir()
    (tmp_path / "qrl" / "metrics.json").write_text('{"iteration": 1, "bbox/AP": 40.0}\n')
    monkeypatch.setattr("sys.argv", ["ablation_sweep.py", "--launcher", "slurm", "--cluster",
                                     "local", "--dry-run", "--config-file", str(DEMO),
                                     "--tables", "b", "--output-dir", str(tmp_path)])  # fmt: skip
    assert sweep.main() == 0
    out = capsys.readouterr().out
    assert f"none: job {os.getpid()} is still queued or running, not resubmitted" in out
    assert "would submit: rch gcl hmc\n" in out


def test_submitits_signal_handlers_act_in_the_task_process_only(tmp_path):
    """A DataLoader worker forked from a task that trains in-process inherits the Python handler
    for the preemption signal; it must not checkpoint and requeue from there."""
    calls = tmp_path / "calls"

    def handler(signum, frame):
        with open(calls, "a") as file:
            file.write(f"{os.getpid()}\n")

    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGUSR2, signal.SIGTERM)
    }
    try:
        slurm._confine_signal_handlers_to_this_process()
        child = os.fork()
        if child == 0:  # a forked worker
            os.kill(os.getpid(), signal.SIGUSR2)
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    assert calls.read_text().split() == [str(os.getpid())]
