"""tools/submit.py and ablation_sweep.py --launcher slurm, without a cluster: the sbatch script of a
2-node x 8-GPU job (submitit writes it; a stand-in sbatch takes it), real demo jobs run by
submitit's local executor as separate processes (their results come back), a job preempted the
way Slurm signals it, requeued, that ends with the uninterrupted run's weights, and a sweep."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from submitit.helpers import DelayedSubmission

from rankdetr.engine.slurm import SlurmOptions, TrainingJob, submit_jobs, training_job
from tests.tools.test_ablation_sweep import table_rows
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "tools" / "submit.py"
SWEEP = ROOT / "tools" / "ablation_sweep.py"
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"

# The demo config, shrunk: two iterations of batch 2, one encoder and one decoder layer, and an
# evaluation at the end (so that metrics come back).
TINY = [
    "train.device=cpu",
    "train.max_iter=2",
    "train.eval_period=2",
    "train.log_period=1",
    "train.checkpointer.period=100",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
]


# The demo config with a small shapes dataset (8 training, 8 validation images, generated into the
# test's folder): the jobs' evaluations take a fraction of a second instead of the 200 images of
# shapes_val. The file registers the datasets in every process that loads it.
SMALL_SHAPES_CONFIG = """
from detectron2.config import LazyConfig
from rankdetr.data import register_shapes_dataset

register_shapes_dataset(root={root!r}, num_images={{"train": 8, "val": 8}})
_demo = LazyConfig.load({demo!r})
model, optimizer, lr_multiplier, dataloader, train = (
    _demo[k] for k in ("model", "optimizer", "lr_multiplier", "dataloader", "train")
)
"""


@pytest.fixture
def small_demo(tmp_path, isolated_catalogs) -> Path:
    """The demo config on 8 + 8 shapes images (SMALL_SHAPES_CONFIG), as a file."""
    config = tmp_path / "small_demo.py"
    config.write_text(SMALL_SHAPES_CONFIG.format(root=str(tmp_path / "shapes"), demo=str(DEMO)))
    return config


@pytest.fixture
def job_environment(monkeypatch):
    """What the job processes inherit: one thread each (exact, and the machine has two cores),
    GLOO on the loopback device, and the repository importable (for the test's own job class)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_tool(tool, *args, env=None, timeout=600):
    return run_python([sys.executable, str(tool), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip


def test_the_sbatch_script_of_a_two_node_job(tmp_path):
    """A 2-node x 8-GPU submission through submitit's Slurm executor; a stand-in `sbatch` on PATH
    records its arguments and answers with a job id, so the real submission path runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/sbatch_args"\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / "run"
    result = run_tool(
        SUBMIT, "--nodes", "2", "--gpus-per-node", "8", "--partition", "learn",
        "--account", "vision", "--qos", "high", "--constraint", "h100", "--time-min", "4320",
        "--setup", "module load cuda/12.1", "--config-file", str(DEMO),
        "train.device=cuda", f"train.output_dir={out}",
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted job 4242" in result.stdout
    folder = out / "slurm"
    script = (folder / "4242_submission.sh").read_text()
    assert (bin_dir / "sbatch_args").read_text().split()[0].startswith(str(folder))
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",  # one task per node spawns the node's 8 workers
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=80",  # 10 per GPU (the default)
        "#SBATCH --mem=512GB",  # 64 GB per GPU (the default)
        "#SBATCH --time=4320",
        "#SBATCH --partition=learn",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --job-name=rankdetr-rank_detr_r18_shapes",
        "#SBATCH --signal=USR2@120",  # submitit's checkpoint-and-requeue signal
        "#SBATCH --requeue",
        f"#SBATCH --output={folder}/%j_0_log.out",
        f"#SBATCH --error={folder}/%j_0_log.err",
        "export OMP_NUM_THREADS=10",
        "module load cuda/12.1",
        "export SUBMITIT_EXECUTOR=slurm",
    ]:
        assert line in script.splitlines(), line
    command = script.splitlines()[-1]
    assert command.startswith(f"srun --unbuffered --output {folder}/%j_%t_log.out")
    assert command.endswith(f"{sys.executable} -u -m submitit.core._submit {folder}")
    # what the job will run: train_net.py's main with 8 workers per node, paths made absolute
    job = DelayedSubmission.load(folder / "4242_submitted.pkl").function
    assert isinstance(job, TrainingJob) and job.script == str(TRAIN_NET)
    assert job.flags == ["--config-file", str(DEMO), "--num-gpus", "8"]
    assert "train.device=cuda" in job.overrides and job.overrides[-1] == f"train.output_dir={out}"


# --- preemption -----------------------------------------------------------------------------

PREEMPT_AFTER = 4  # iteration; checkpoints are written after iterations 1, 3 and 5


class PreemptedOnce(TrainingJob):
    """A training job that, on its first attempt, sends itself submitit's preemption signal
    (what Slurm sends, USR2) right after iteration PREEMPT_AFTER. Pickled by reference: the job
    process imports this module."""

    def __call__(self):
        if "--resume" not in self.flags:
            from rankdetr.engine.trainer import RankDETRTrainer

            after_step = RankDETRTrainer.after_step

            def after_step_then_preempt(trainer):
                after_step(trainer)
                if trainer.iter == PREEMPT_AFTER:
                    os.kill(os.getpid(), signal.SIGUSR2)

            RankDETRTrainer.after_step = after_step_then_preempt
        return super().__call__()


def final_state(out_dir):
    checkpoint = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=True)
    return checkpoint["model"], checkpoint["trainer"]["optimizer"]["state"]


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(
    tmp_path, job_environment, small_demo
):
    """Two local jobs at once: the reference run through `tools/submit.py --wait` (its results
    come back), and the same run, preempted after iteration 4, through the Python API."""
    overrides = ["train.max_iter=6", "train.checkpointer.period=2", "train.seed=7",
                 "train.deterministic=True", "model.num_queries=10",
                 "model.num_queries_one2many=20", "model.num_detections=10",
                 *TINY[5:]]  # fmt: skip
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference = subprocess.Popen(
        [sys.executable, str(SUBMIT), "--cluster", "local", "--gpus-per-node", "0", "--wait",
         "--config-file", str(small_demo), *overrides, f"train.output_dir={reference_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    options = SlurmOptions(cluster="local", gpus_per_node=0, time_min=30)
    job = training_job(TRAIN_NET, str(small_demo),
                       [*overrides, f"train.output_dir={preempted_dir}"], options)  # fmt: skip
    job = PreemptedOnce(job.script, job.flags, job.overrides, job.output_dir)
    (preempted,) = submit_jobs([job], options, preempted_dir / "slurm")
    stdout, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = json.loads(stdout[stdout.index("{") :])
    assert results["output_dir"] == str(reference_dir)
    assert results["model_final"] == str(reference_dir / "model_final.pth")
    assert results["iteration"] == 6  # the evaluation after the last iteration (5)
    assert 0 <= results["metrics"]["AP"] <= 100 and "oLRP" in results["metrics"]
    assert preempted.result()["iteration"] == 6

    logs = "".join(path.read_text() for path in (preempted_dir / "slurm").glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs
    assert "Requeued job" in logs
    trainer_log = (preempted_dir / "log.txt").read_text()
    assert (
        "model_0000003.pth" in trainer_log and "Starting training from iteration 4" in trainer_log
    )
    expected, actual = final_state(reference_dir), final_state(preempted_dir)
    for what, reference_state, resumed_state in zip(("model", "optimizer"), expected, actual):
        flat_reference, flat_resumed = _flatten(reference_state), _flatten(resumed_state)
        assert flat_reference.keys() == flat_resumed.keys(), what
        for key, value in flat_reference.items():
            assert torch.equal(value, flat_resumed[key]), f"{what} {key} differs after the requeue"


def _flatten(state, prefix=""):
    if not isinstance(state, dict):
        return {prefix: state}
    flat = {}
    for key, value in state.items():
        flat.update(_flatten(value, f"{prefix}/{key}"))
    return flat


# --- the sweep ------------------------------------------------------------------------------


def write_metrics(run_dir, ap):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"iteration": 1, "bbox/AP": ap}) + "\n")


@pytest.mark.slow(seconds=30)
def test_a_sweep_submits_the_missing_runs_as_jobs_and_tabulates_them(
    tmp_path, job_environment, small_demo
):
    """Table 4 (a) has five runs; four are finished already, so one job trains the missing one,
    with two GLOO workers launched by its task, as a node's task launches its GPUs' workers.
    (Two jobs at once: the preemption test above; each job costs three processes here.)"""
    for name in ("rch", "rch_qrl", "rch_qrl_gcl", "rch_qrl_gcl_hmc"):
        write_metrics(tmp_path / name, 50.0)
    command = [
        "--launcher",
        "slurm",
        "--cluster",
        "local",
        "--gpus-per-node",
        "2",
        "--config-file",
        str(small_demo),
        "--tables",
        "a",
        "--output-dir",
        str(tmp_path),
    ]
    result = run_tool(SWEEP, *command, "--wait", "--", *TINY)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submitted = [line for line in result.stdout.splitlines() if line.startswith("submitted")]
    assert [line.split(":")[0] for line in submitted] == ["submitted none"]
    assert (tmp_path / "none" / "model_final.pth").is_file()
    assert "World size: 2" in (tmp_path / "none" / "log.txt").read_text()
    assert json.loads((tmp_path / "none" / "slurm_job.json").read_text())["cluster"] == "local"
    assert len(list((tmp_path / "slurm").glob("*_submitted.pkl"))) == 1
    rows = [row for row in table_rows((tmp_path / "table4.md").read_text()) if row[0] in "✓✗"]
    assert len(rows) == 5 and all("50.0" in row for row in rows[1:])
    # The trained run has every metric but the large-object ones (no large shapes).
    assert rows[0].count("—") == 2 and "50.0" not in rows[0], rows[0]

    again = run_tool(SWEEP, *command, "--", *TINY)  # everything finished: nothing is submitted
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stderr[-3000:]
    assert len(list((tmp_path / "slurm").glob("*_submitted.pkl"))) == 1
