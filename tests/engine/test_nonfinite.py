"""Non-finite losses: "error" names the terms and the iteration and saves nothing from the bad
step; "skip" leaves the weights alone for that step and counts it; DDP processes agree."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, hooks

from rankdetr.engine.trainer import NonFiniteLossError, RankDETRTrainer, nonfinite_terms


class StubModel(torch.nn.Module):
    """Two loss terms; `bad` maps a call number (= iteration, from 0) to {term: bad value}."""

    def __init__(self, bad: dict[int, dict[str, float]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.bad, self.calls = bad, 0

    def forward(self, batch):
        losses = {
            "loss_class": (self.weight * batch).sum() ** 2,
            "loss_bbox": self.weight.abs().sum(),
        }
        for name, value in self.bad.get(self.calls, {}).items():
            losses[name] = losses[name] * value  # keeps the graph, like a real blow-up
        self.calls += 1
        return losses


class RecordWeights(HookBase):
    def __init__(self, model):
        self.model, self.history = model, []

    def after_step(self):
        self.history.append(self.model.weight.detach().clone())


def make_trainer(model, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return RankDETRTrainer(
        model, [torch.ones(2)] * 100, optimizer, clip_grad_params=None, **options
    )


def test_error_mode_names_terms_and_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    model = StubModel({3: {"loss_bbox": float("nan"), "loss_class": float("inf")}})
    trainer = make_trainer(model)
    checkpointer = DetectionCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, period=1)])
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train(0, 6)
    message = str(error.value)
    assert "non-finite loss at iteration 3" in message
    assert "loss_class=inf" in message and "loss_bbox=nan" in message
    saved = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert saved == ["model_0000000.pth", "model_0000001.pth", "model_0000002.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    newest = torch.load(tmp_path / "model_0000002.pth", weights_only=False)
    assert newest["iteration"] == 2
    torch.testing.assert_close(newest["model"]["weight"], model.weight.detach())  # no bad step


def test_a_single_non_finite_term_is_named_alone():
    trainer = make_trainer(StubModel({0: {"loss_class": float("-inf")}}))
    with pytest.raises(NonFiniteLossError, match=r"iteration 0: loss_class=-inf \(train"):
        trainer.train(0, 2)


def test_skip_mode_leaves_the_weights_alone_for_that_step_and_counts_it():
    model = StubModel({2: {"loss_bbox": float("nan")}})
    trainer = make_trainer(model, nonfinite_loss="skip")
    recorder = RecordWeights(model)
    trainer.register_hooks([recorder])
    trainer.train(0, 5)
    history = recorder.history
    assert torch.equal(history[2], history[1])  # iteration 2: no step
    assert not torch.equal(history[3], history[2]) and not torch.equal(history[1], history[0])
    assert trainer.nonfinite_skips == 1 and trainer.consecutive_nonfinite_skips == 0
    values = trainer.storage.history("nonfinite_skips").values()
    assert values == [(1, 2)]  # (count, iteration)

    # The momentum buffer was not touched either: the run equals one without the bad batch.
    clean = StubModel({})
    clean_trainer = make_trainer(clean)
    clean_recorder = RecordWeights(clean)
    clean_trainer.register_hooks([clean_recorder])
    clean_trainer.train(0, 4)
    for skipped, plain in zip(history[3:], clean_recorder.history[2:]):
        torch.testing.assert_close(skipped, plain)


def test_skip_mode_stops_after_max_consecutive_skips(caplog):
    bad = {i: {"loss_bbox": float("nan")} for i in (1, 3, 4)}
    trainer = make_trainer(StubModel(bad), nonfinite_loss="skip", max_nonfinite_skips=2)
    with pytest.raises(NonFiniteLossError, match=r"iteration 4: .*2 consecutive steps"):
        trainer.train(0, 10)
    assert trainer.nonfinite_skips == 3  # 1 (reset by iteration 2), then 3 and 4
    assert "3 skipped so far, 2 in a row" in caplog.text


def test_bad_options_are_refused():
    model = StubModel({})
    with pytest.raises(ValueError, match="train.nonfinite_loss must be 'error' or 'skip'"):
        make_trainer(model, nonfinite_loss="ignore")
    with pytest.raises(ValueError, match="train.max_nonfinite_skips must be a positive int"):
        make_trainer(model, nonfinite_loss="skip", max_nonfinite_skips=0)


def test_nonfinite_terms_checks_every_element():
    losses = {
        "a": torch.tensor([1.0, float("nan")]),
        "b": torch.tensor(2.0),
        "c": torch.tensor(0.0),
    }
    assert nonfinite_terms(losses) == ["a"]
    assert nonfinite_terms({}) == []


def test_do_train_passes_the_options(monkeypatch, tmp_path):
    from rankdetr.engine import runner

    captured = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        captured.update(kwargs)
        raise Stop

    monkeypatch.setattr(runner, "RankDETRTrainer", fake_trainer)
    demo = os.path.join(os.path.dirname(__file__), "../../configs/demo/rank_detr_r18_shapes.py")
    cfg = runner.load_config(demo, ["train.nonfinite_loss=skip", "train.max_nonfinite_skips=3",
                                    f"train.output_dir={tmp_path}",
                                    "dataloader.train.num_workers=0"])  # fmt: skip
    with pytest.raises(Stop):
        runner.do_train(cfg)
    assert captured["nonfinite_loss"] == "skip" and captured["max_nonfinite_skips"] == 3
    default = runner.load_config(demo, [])
    assert default.train.nonfinite_loss == "error" and default.train.max_nonfinite_skips is None


# --- DDP ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(rank: int, mode: str):
    """3 iterations of DDP training where only rank 0's loss is NaN at iteration 1."""
    torch.manual_seed(0)
    model = StubModel({1: {"loss_bbox": float("nan")}} if rank == 0 else {})
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    trainer = make_trainer(ddp, nonfinite_loss=mode)
    recorder = RecordWeights(model)
    trainer.register_hooks([recorder])
    try:
        trainer.train(0, 3)
        outcome = "finished"
    except NonFiniteLossError as error:
        outcome = str(error)
    return outcome, trainer.nonfinite_skips, [w.tolist() for w in recorder.history]


def _ddp_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = {mode: _ddp_run(rank, mode) for mode in ("skip", "error")}
    finally:
        dist.destroy_process_group()


def test_the_decision_uses_every_process_flags(monkeypatch):
    # Another process (simulated: all_reduce adds its flags) has a NaN in loss_bbox only.
    from rankdetr.engine import trainer as trainer_module

    def all_reduce(flags):
        flags += torch.tensor([0, 1], dtype=flags.dtype)

    monkeypatch.setattr(trainer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    losses = {"loss_class": torch.tensor(float("nan")), "loss_bbox": torch.tensor(1.0)}
    assert nonfinite_terms(losses) == ["loss_class", "loss_bbox"]
    assert nonfinite_terms({"loss_class": torch.tensor(1.0), "loss_bbox": torch.tensor(1.0)}) == [
        "loss_bbox"
    ]


@pytest.mark.slow
def test_ddp_processes_take_the_same_decision():
    # Only rank 0 sees the NaN: rank 1 must skip (or stop) too, else DDP would hang or diverge.
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(_free_port(), results), nprocs=2, join=True)
    skip0, skip1 = results[0]["skip"], results[1]["skip"]
    assert skip0[0] == skip1[0] == "finished" and skip0[1] == skip1[1] == 1
    history = skip0[2]
    assert history == skip1[2] and history[1] == history[0] and history[2] != history[1]
    error0, error1 = results[0]["error"], results[1]["error"]
    assert "iteration 1: loss_bbox=" in error0[0] and "iteration 1: loss_bbox=" in error1[0]
    assert error0[2] == error1[2] and len(error0[2]) == 1
