"""Engine pieces: config overrides, devices, LR groups and schedule, hooks, AMP, a short run."""

import json
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from rankdetr.engine.hooks import EMAHook, TrainingProgressHook
from rankdetr.engine.optim import param_groups_with_lr_multipliers, step_lr_schedule
from rankdetr.engine.runner import (
    ConfigError,
    build_model,
    do_test,
    do_train,
    load_config,
    resolve_device,
)
from rankdetr.engine.trainer import RankDETRTrainer
from tests.conftest import REPO_ROOT, load_tool

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py")


def test_unknown_override_key_names_close_matches():
    with pytest.raises(ConfigError, match=r"'model.rank.qlr'.*close matches: model.rank.qrl"):
        load_config(DEMO, ["model.rank.qlr=False"])
    cfg = load_config(DEMO, ["model.rank.qrl=False", "train.max_iter=7"])
    assert cfg.model.rank.qrl is False and cfg.train.max_iter == 7


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.py"):
        load_config(str(tmp_path / "nope.py"), [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_lr_multipliers_and_step_schedule():
    model = torch.nn.ModuleDict(
        {
            "backbone": torch.nn.Linear(2, 2),
            "head": torch.nn.Linear(2, 2),
            "frozen": torch.nn.Linear(2, 2),
        }
    )
    model["frozen"].requires_grad_(False)
    groups = param_groups_with_lr_multipliers(model, 1e-4, {"backbone": 0.1})
    by_lr = sorted((g["lr"], len(g["params"])) for g in groups)
    assert by_lr == [(pytest.approx(1e-5), 2), (pytest.approx(1e-4), 2)]
    schedule = step_lr_schedule(max_iter=120, drop_fraction=11 / 12)
    assert schedule(0.0) == 1.0 and schedule(109 / 120) == 1.0 and schedule(111 / 120) == 0.1


class RecordingModel(torch.nn.Module):
    """Returns a loss; records training progress and whether autocast was on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.progress, self.autocast = [], []

    def set_training_progress(self, progress):
        self.progress.append(progress)

    def forward(self, batch):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return {"loss": (self.weight * batch).sum() ** 2}


def run_trainer(model, iterations, amp=None, extra_hooks=()):
    data = [torch.ones(3)] * 100
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = RankDETRTrainer(model, data, optimizer, amp=amp, clip_grad_params={"max_norm": 1.0})
    trainer.register_hooks([TrainingProgressHook(model), *extra_hooks])
    with EventStorage():
        trainer.train(0, iterations)
    return trainer


def test_progress_hook_reports_iteration_over_max_iter_and_amp_runs_the_forward_in_autocast():
    model = RecordingModel()
    run_trainer(model, 4, amp="bf16")
    assert model.progress == [0.0, 0.25, 0.5, 0.75]
    assert model.autocast == [True] * 4
    plain = RecordingModel()
    run_trainer(plain, 2)
    assert plain.autocast == [False, False]
    with pytest.raises(ValueError, match="fp16"):
        RankDETRTrainer(plain, [], torch.optim.SGD(plain.parameters(), lr=0.1), amp="fp16")


class RecordWeights(HookBase):
    def __init__(self, model):
        self.model, self.history = model, []

    def after_step(self):
        self.history.append(self.model.weight.detach().clone())


def test_ema_follows_its_formula():
    model = RecordingModel()
    initial = model.weight.detach().clone()
    recorder, ema = RecordWeights(model), EMAHook(model, decay=0.5)
    run_trainer(model, 3, extra_hooks=[recorder, ema])
    expected = initial
    for t, weight in enumerate(recorder.history, start=1):
        decay = min(0.5, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * weight
    with ema.averaged_weights():
        torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), recorder.history[-1])  # restored
    assert ema.state_dict()["updates"] == 3


@pytest.mark.slow
def test_short_demo_run_trains_evaluates_and_resumes(tmp_path):
    from rankdetr.data import register_shapes_dataset

    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 16, "val": 4})
    overrides = [
        "train.max_iter=4",
        "train.eval_period=4",
        "train.log_period=2",
        f"train.output_dir={tmp_path / 'out'}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.checkpointer.period=2",
    ]
    cfg = load_config(DEMO, overrides)
    do_train(cfg)
    out = tmp_path / "out"
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_class" in m for m in metrics) and any("bbox/AP" in m for m in metrics)
    # Resuming a finished run restores the iteration and does not train further: no new
    # training step is logged and the final weights stay those of the first run.
    final_weights = torch.load(out / "model_final.pth", weights_only=True)["model"]
    steps_logged = sum("total_loss" in m for m in metrics)
    cfg = load_config(DEMO, overrides)
    do_train(cfg, resume=True)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert sum("total_loss" in m for m in metrics) == steps_logged
    resumed_weights = torch.load(out / "model_final.pth", weights_only=True)["model"]
    for name, tensor in final_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    cfg = load_config(DEMO, overrides + [f"train.init_checkpoint={out / 'model_final.pth'}"])
    model = build_model(cfg)
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    model.eval()
    results = do_test(cfg, model)
    assert "AP" in results["bbox"]
    # tools/benchmark_cpu_goals.py reads the demo's AP from metrics.json: the final weights' AP.
    goals = load_tool(REPO_ROOT / "tools" / "benchmark_cpu_goals.py", "benchmark_cpu_goals")
    assert goals.final_ap(out) == results["bbox"]["AP"]


def test_no_evaluator_trains_without_any_inference(tmp_path, monkeypatch):
    """`dataloader.evaluator=None`: no evaluation at all, also not the one after the last
    iteration that `train.eval_period=0` keeps (detectron2's EvalHook)."""
    from rankdetr.data import register_shapes_dataset
    from rankdetr.engine import runner

    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran with dataloader.evaluator=None")

    monkeypatch.setattr(runner, "inference_on_dataset", no_inference)
    overrides = ["train.max_iter=1", "train.eval_period=0", "dataloader.evaluator=None",
                 "dataloader.train.total_batch_size=1", "dataloader.train.num_workers=0",
                 "model.encoder_layers=1", "model.decoder_layers=1",
                 f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cfg = load_config(DEMO, overrides)
    assert cfg.dataloader.evaluator is None
    do_train(cfg)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert not (tmp_path / "out" / "inference").exists()
