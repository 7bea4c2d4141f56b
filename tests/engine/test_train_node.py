"""The `train` node has detrex's names: old names are refused with the new one, and the new ones
reach the trainer (autocast dtype, gradient clipping with its norm type, model EMA, fast_dev_run).
"""

import re
from pathlib import Path

import pytest
import torch
from detectron2.utils.events import EventStorage

import rankdetr.engine.runner as runner
from rankdetr.engine.config_checks import ConfigError
from rankdetr.engine.runner import do_train, load_config
from rankdetr.engine.trainer import RankDETRTrainer

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")
R50 = str(ROOT / "configs" / "rank_detr" / "rank_detr_r50_12ep.py")


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.amp=bf16", "train.amp.enabled=True train.amp.dtype=bf16"),
        ("train.amp=null", "train.amp.enabled=True train.amp.dtype=bf16"),
        ("train.clip_grad_norm=0.1", "renamed to train.clip_grad.params.max_norm"),
        ("train.ema.enabled=True", "renamed to train.model_ema.enabled"),
        ("train.ema.decay=0.99", "renamed to train.model_ema.decay"),
        (
            "train.ema.evaluate_average=False",
            "renamed to train.model_ema.use_ema_weights_for_eval_only",
        ),
    ],
)
def test_an_old_name_on_the_command_line_is_refused_with_the_new_one(override, suggestion):
    with pytest.raises(ConfigError, match=re.escape(suggestion)) as error:
        load_config(DEMO, [override])
    assert f"override {override!r}" in str(error.value)


def user_config(tmp_path, lines: str) -> str:
    """A user's config file built on the demo config, with `lines` appended."""
    path = tmp_path / "my_config.py"
    path.write_text(
        "from detectron2.config import LazyConfig\n\n"
        f"_base = LazyConfig.load({DEMO!r})\n"
        "model, dataloader, optimizer, train = (_base[key] for key in "
        "('model', 'dataloader', 'optimizer', 'train'))\n"
        "lr_multiplier = _base.lr_multiplier\n" + lines
    )
    return str(path)


@pytest.mark.parametrize(
    "line, suggestion",
    [
        ('train.amp = "bf16"', "sets train.amp='bf16'; train.amp is a node as in detrex"),
        ("train.clip_grad_norm = 0.5", "sets train.clip_grad_norm, renamed to train.clip_grad"),
        ("train.ema = dict(enabled=True)", "sets train.ema, renamed to train.model_ema"),
        ("train.ema.enabled = True", "uses train.ema, renamed to train.model_ema"),
    ],
)
def test_an_old_name_in_a_config_file_is_refused_with_the_new_one(tmp_path, line, suggestion):
    path = user_config(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=re.escape(suggestion)) as error:
        load_config(path, [])
    assert "my_config.py" in str(error.value)


def test_the_new_names_load_from_a_config_file_and_the_command_line(tmp_path):
    # The demo trains with amp enabled in dtype "auto": the file changes both.
    lines = "train.amp.enabled = False\ntrain.amp.dtype = 'bf16'\ntrain.clip_grad.enabled = False\n"
    path = user_config(tmp_path, lines)
    cfg = load_config(path, ["train.model_ema.enabled=True", "train.model_ema.decay=0.99"])
    assert not cfg.train.amp.enabled and cfg.train.amp.dtype == "bf16"
    assert not cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.train.model_ema.enabled and cfg.train.model_ema.decay == 0.99
    with pytest.raises(ConfigError, match=r"no key 'train.model_ema.decya'.*model_ema.decay"):
        load_config(DEMO, ["train.model_ema.decya=0.9"])


def test_the_train_node_holds_detrex_names():
    """Every key of detrex's train node that rankdetr implements, at the same path."""
    train = load_config(R50, []).train
    for key in ("amp.enabled", "clip_grad.enabled", "clip_grad.params.max_norm",
                "clip_grad.params.norm_type", "model_ema.enabled", "model_ema.decay",
                "model_ema.device", "model_ema.use_ema_weights_for_eval_only",
                "fast_dev_run.enabled", "checkpointer.period", "checkpointer.max_to_keep",
                "eval_period", "log_period", "device", "init_checkpoint", "output_dir", "seed",
                "ddp.broadcast_buffers", "ddp.find_unused_parameters"):  # fmt: skip
        node = train
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_fast_dev_run_runs_20_iterations_evaluating_at_10_and_20():
    cfg = load_config(DEMO, ["train.fast_dev_run.enabled=True"])
    assert (cfg.train.max_iter, cfg.train.eval_period, cfg.train.log_period) == (20, 10, 1)
    assert cfg.lr_multiplier.max_iter == 20  # the schedule follows
    plain = load_config(DEMO, [])
    assert (plain.train.max_iter, plain.train.eval_period) == (1100, 1100)


class StopBeforeTraining(Exception):
    pass


@pytest.fixture
def trainer_arguments(monkeypatch, tmp_path):
    """do_train on the demo config up to building the trainer: the arguments it got."""
    seen = {}

    class Recording(RankDETRTrainer):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise StopBeforeTraining

    monkeypatch.setattr(runner, "RankDETRTrainer", Recording)

    def run(*overrides):
        cfg = load_config(DEMO, [f"train.output_dir={tmp_path}", *overrides])
        with pytest.raises(StopBeforeTraining):
            do_train(cfg)
        return seen

    return run


def test_amp_and_clip_grad_reach_the_trainer(trainer_arguments):
    seen = trainer_arguments()
    assert seen["amp"] == "auto"  # the demo's setting, resolved by the trainer
    assert dict(seen["clip_grad_params"]) == {"max_norm": 0.1, "norm_type": 2}
    seen = trainer_arguments("train.amp.enabled=False", "train.amp.dtype=bf16")
    assert seen["amp"] is None  # amp.enabled=False: the dtype is not used
    seen = trainer_arguments(
        "train.amp.enabled=True", "train.clip_grad.enabled=False", "train.amp.dtype=bf16"
    )
    assert seen["amp"] == "bf16" and seen["clip_grad_params"] is None


class Dot(torch.nn.Module):
    """loss = w . batch: the gradient of w is the batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, batch):
        return {"loss": (self.weight * batch).sum()}


def test_clip_grad_params_are_clip_grad_norm_arguments():
    """max_norm and norm_type both act: gradient (3, 4) clipped to norm 1 in L2 and in L1."""
    for norm_type, expected in ((2, [0.6, 0.8]), (1, [3 / 7, 4 / 7])):
        model = Dot()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        params = {"max_norm": 1.0, "norm_type": norm_type}
        trainer = RankDETRTrainer(model, [torch.tensor([3.0, 4.0])] * 2, optimizer,
                                  clip_grad_params=params)  # fmt: skip
        with EventStorage():
            trainer.train(0, 1)
        assert torch.allclose(-model.weight.detach(), torch.tensor(expected)), norm_type
