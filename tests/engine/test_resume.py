"""Exact resume: the resumable data stream, LR schedule and EMA after a resume, and a training
run killed with SIGKILL and resumed with --resume ending with the uninterrupted run's weights."""

import os
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase, hooks

from rankdetr.data.samplers import (
    ResumableBatchSampler,
    SeededMapDataset,
    build_resumable_train_loader,
    mix_seed,
)
from rankdetr.data.synthetic import SHAPES_SPLITS, generate_shapes_dataset
from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.engine.hooks import EMAHook, SeedHook, TrainingProgressHook
from rankdetr.engine.optim import step_lr_schedule
from rankdetr.engine.trainer import RankDETRTrainer
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


# --- the data stream ----------------------------------------------------------------------


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("groups", [None, [0, 1, 1, 0, 1, 0, 0]])
def test_a_resumed_stream_continues_the_uninterrupted_one(groups):
    full = take(iter(ResumableBatchSampler(7, 2, seed=5, group_ids=groups)), 12)
    resumed = take(iter(ResumableBatchSampler(7, 2, seed=5, group_ids=groups, start_batch=5)), 7)
    assert resumed == full[5:]
    assert take(iter(ResumableBatchSampler(7, 2, seed=6, group_ids=groups)), 12) != full


def test_each_epoch_is_a_permutation_shared_out_between_ranks():
    n, world = 10, 2
    per_rank = [
        take(iter(ResumableBatchSampler(n, 1, seed=3, rank=r, world_size=world)), 2 * n // world)
        for r in range(world)
    ]
    # position p is rank p % world's (p // world)-th sample
    stream = [per_rank[p % world][p // world][0] for p in range(2 * n)]
    indices = [index for index, _ in stream]
    assert sorted(indices[:n]) == list(range(n)) and sorted(indices[n:]) == list(range(n))
    assert indices[:n] != indices[n:]  # a new order each epoch
    seeds = [seed for _, seed in stream]
    assert seeds == [mix_seed(3, p) for p in range(2 * n)] and len(set(seeds)) == 2 * n


def test_aspect_ratio_groups_never_mix_in_a_batch():
    groups = [0, 0, 1, 0, 1, 1, 1, 0, 0]
    for batch in take(iter(ResumableBatchSampler(9, 3, seed=1, group_ids=groups)), 10):
        assert len({groups[index] for index, _ in batch}) == 1


def draws(record):
    """A mapper whose output is its global-RNG draws."""
    return {
        "id": record["id"],
        "draws": (np.random.rand(), random.random(), torch.rand(()).item()),
    }


def test_mapping_is_seeded_per_sample_and_leaves_the_global_generators_alone():
    dataset = SeededMapDataset([{"id": 0}, {"id": 1}], draws)
    torch.manual_seed(0)
    expected_next = torch.rand(()).item()
    torch.manual_seed(0)
    first = dataset[(1, 1234)]
    assert torch.rand(()).item() == expected_next  # the caller's stream is untouched
    np.random.seed(99)
    random.seed(99)
    again = dataset[(1, 1234)]
    assert first == again and first["id"] == 1
    assert dataset[(1, 1235)]["draws"] != first["draws"]
    with pytest.raises(ValueError, match="returned None for dataset entry 0"):
        SeededMapDataset([{"id": 0, "file_name": "a.png"}], lambda record: None)[(0, 1)]


# --- LR schedule and EMA after a resume ---------------------------------------------------


class Quadratic(torch.nn.Module):
    """loss = sum((w * x - 1)^2) + dropout noise: uses the global RNG as a model's dropout."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.progress = []

    def set_training_progress(self, progress):
        self.progress.append(progress)

    def forward(self, batch):
        noisy = torch.nn.functional.dropout(self.weight * batch, p=0.25)
        return {"loss": ((noisy - 1) ** 2).sum()}


class RecordLR(HookBase):
    def __init__(self):
        self.lrs = {}

    def before_step(self):
        self.lrs[self.trainer.iter] = self.trainer.optimizer.param_groups[0]["lr"]


class Crash(Exception):
    pass


class CrashAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise Crash


def train_quadratic(out_dir, resume=False, crash_after=None):
    """Six iterations of a RankDETRTrainer with the hooks do_train uses (checkpoints after
    iterations 2 and 5); returns (model, trainer, ema, {iteration: lr})."""
    torch.manual_seed(0)
    model = Quadratic()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = RankDETRTrainer(model, [torch.ones(4)] * 20, optimizer, clip_grad_params=None)
    ema, record = EMAHook(model, decay=0.5), RecordLR()
    checkpointer = SafeCheckpointer(model, str(out_dir), trainer=trainer)
    trainer.register_hooks(
        [
            SeedHook(11),
            TrainingProgressHook(model),  # drives the HMC switch
            ema,
            hooks.LRScheduler(scheduler=step_lr_schedule(max_iter=6, drop_fraction=4 / 6)),
            hooks.PeriodicCheckpointer(checkpointer, period=3),
            record,
            CrashAfter(crash_after),
        ]
    )
    resuming = resume and checkpointer.has_checkpoint()
    checkpointer.resume_or_load("", resume=resuming)
    start = trainer.iter + 1 if resuming else 0
    trainer.train(start, 6)
    return model, trainer, ema, record.lrs


def test_lr_schedule_ema_and_random_draws_resume_where_they_were(tmp_path):
    model, _, ema, lrs = train_quadratic(tmp_path / "full")
    with pytest.raises(Crash):  # after iteration 3: the last checkpoint is iteration 2's
        train_quadratic(tmp_path / "crashed", crash_after=3)
    resumed, trainer, resumed_ema, resumed_lrs = train_quadratic(tmp_path / "crashed", resume=True)
    assert trainer.start_iter == 3
    assert resumed.progress == [3 / 6, 4 / 6, 5 / 6]  # from the resumed iteration
    # The step schedule drops the LR x0.1 at iteration 4 of 6 (hand-computed).
    assert resumed_lrs == {3: pytest.approx(0.1), 4: pytest.approx(0.01), 5: pytest.approx(0.01)}
    assert {k: lrs[k] for k in (3, 4, 5)} == resumed_lrs
    assert torch.equal(resumed.weight, model.weight)
    assert resumed_ema.updates == ema.updates == 6
    assert torch.equal(resumed_ema.shadow["weight"], ema.shadow["weight"])
    # the EMA is not trivially the weights
    assert not torch.equal(ema.shadow["weight"], model.weight.detach())


# --- a killed training run ----------------------------------------------------------------

# Runs tools/train_net.py on a small shapes dataset; with KILL_AFTER_ITER=N the process kills
# itself with SIGKILL right after iteration N (after that iteration's hooks, checkpoints included).
WRAPPER = textwrap.dedent("""
    import os, runpy, signal, sys

    from rankdetr.data import register_shapes_dataset
    from rankdetr.engine.trainer import RankDETRTrainer

    register_shapes_dataset(root=sys.argv[1], num_images={"train": 8, "val": 2})
    kill_after = int(os.environ.get("KILL_AFTER_ITER", "-1"))
    original_after_step = RankDETRTrainer.after_step

    def after_step(self):
        original_after_step(self)
        if self.iter == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    RankDETRTrainer.after_step = after_step
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)

OVERRIDES = [
    "train.device=cpu",
    "train.max_iter=12",
    "train.checkpointer.period=4",
    "train.eval_period=0",
    "dataloader.evaluator=None",  # no evaluation: not what this checks
    "train.log_period=4",
    "train.seed=7",
    "train.deterministic=True",
    "train.model_ema.enabled=True",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentation.1.short_edge_length=[48,64]",
    "dataloader.train.mapper.augmentation.1.max_size=80",
    "dataloader.train.mapper.augmentation_with_crop.1.short_edge_length=[64]",
    "dataloader.train.mapper.augmentation_with_crop.2.crop_size=[40,56]",
    "dataloader.train.mapper.augmentation_with_crop.3.short_edge_length=[48,64]",
    "dataloader.train.mapper.augmentation_with_crop.3.max_size=80",
    "dataloader.train.mapper.crop_probability=0.5",
    "dataloader.test.mapper.augmentation.0.short_edge_length=48",
    "dataloader.test.mapper.augmentation.0.max_size=80",
    "model.encoder_layers=1",
    "model.decoder_layers=2",
    "model.num_queries=10",
    "model.num_queries_one2many=20",
    "model.num_detections=10",
    "model.dropout=0.1",  # the random draws must resume too
]


def run_training(tmp_path, out_dir, *flags, kill_after=None):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kill_after is not None:
        env["KILL_AFTER_ITER"] = str(kill_after)
    command = [sys.executable, str(wrapper), str(tmp_path / "shapes"), str(TRAIN_NET)]
    command += ["--config-file", str(DEMO), *flags, *OVERRIDES, f"train.output_dir={out_dir}"]
    return run_python(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def final_state(out_dir):
    checkpoint = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=True)
    trainer = checkpoint["trainer"]
    return {
        "model": checkpoint["model"],
        "ema": trainer["hooks"]["EMAHook"]["shadow"],
        "optimizer": trainer["optimizer"]["state"],
        "lr": [group["lr"] for group in trainer["optimizer"]["param_groups"]],
        "iteration": trainer["iteration"],
    }


def assert_same_tensors(expected: dict, actual: dict, what: str):
    assert expected.keys() == actual.keys(), what
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_tensors(value, actual[key], f"{what}[{key}]")
        else:
            assert torch.equal(value, actual[key]), f"{what}[{key}] differs after the resume"


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_final_weights(tmp_path):
    for split in ("train", "val"):  # generated once here, not in each process
        generate_shapes_dataset(tmp_path / "shapes", split, 8 if split == "train" else 2,
                                SHAPES_SPLITS[split]["seed"])  # fmt: skip
    reference = run_training(tmp_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed = run_training(tmp_path, killed_dir, kill_after=5)
    assert killed.returncode == -9, killed.stderr[-3000:]  # killed by SIGKILL
    assert (killed_dir / "model_0000003.pth").is_file()
    assert not (killed_dir / "model_0000007.pth").exists()

    resumed = run_training(tmp_path, killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "model_0000003.pth" in log and "Starting training from iteration 4" in log

    expected, actual = final_state(tmp_path / "reference"), final_state(killed_dir)
    assert actual["iteration"] == expected["iteration"] == 11
    assert actual["lr"] == expected["lr"]
    for part in ("model", "ema", "optimizer"):
        assert_same_tensors(expected[part], actual[part], part)


def test_worker_processes_give_the_batches_of_the_main_process():
    dataset = [{"id": i, "width": 10 + i % 3, "height": 11} for i in range(9)]

    def batches(num_workers):
        loader = build_resumable_train_loader(
            dataset, mapper=draws, total_batch_size=2, num_workers=num_workers, seed=4
        )
        loader.resume_at(3, seed=4)
        return take(iter(loader), 5)

    in_main = batches(0)
    assert batches(2) == in_main
    expected_ids = [[index for index, _ in batch] for batch in take(iter(ResumableBatchSampler(
        9, 2, seed=4, group_ids=[0 if r["width"] > r["height"] else 1 for r in dataset],
        start_batch=3)), 5)]  # fmt: skip
    assert [[item["id"] for item in batch] for batch in in_main] == expected_ids
