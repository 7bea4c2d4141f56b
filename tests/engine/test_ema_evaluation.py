"""Evaluation takes a checkpoint's EMA weights when it holds them (detrex's model EMA), at every
entry point: --eval-only, evaluation during training, the Predictor and the figure commands;
train.model_ema.use_ema_weights_for_eval_only=False switches back to the trained weights."""

import argparse
import runpy
import sys

import numpy as np
import pytest
import torch

import rankdetr.engine.runner as runner
from rankdetr import Predictor
from rankdetr.analysis.loading import load_models
from rankdetr.engine.checkpoint import CheckpointError, load_for_evaluation
from rankdetr.engine.runner import build_model, do_train, load_config
from tests.conftest import REPO_ROOT
from tests.test_predictor import DEMO_CONFIG, TINY_OVERRIDES

OFF = "train.model_ema.use_ema_weights_for_eval_only=False"


def shifted(state: dict) -> dict:
    """An "average" that differs from every floating-point weight."""
    return {k: v + 0.5 for k, v in state.items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny demo model saved as training saves it, with an EMA average, and in detrex's
    layout (`ema_state`, names under DDP's `module.`); plus the weights and the average."""
    folder = tmp_path_factory.mktemp("ema")
    torch.manual_seed(0)
    state = build_model(load_config(DEMO_CONFIG, TINY_OVERRIDES)).state_dict()
    average = shifted(state)
    hooks = {"EMAHook": {"updates": 3, "shadow": average}, "SeedHook": {"seed": 1}}
    torch.save({"model": state, "trainer": {"iteration": 2, "hooks": hooks}}, folder / "ours.pth")
    detrex = {f"module.{k}": v for k, v in average.items()}
    torch.save({"model": state, "ema_state": detrex, "iteration": 2}, folder / "detrex.pth")
    torch.save({"model": state}, folder / "plain.pth")
    return folder, state, average


def assert_weights(model: torch.nn.Module, expected: dict) -> None:
    current = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(current[name], tensor), name


def recorder(evaluated: list):
    """A do_test that records a copy of the weights it is given to evaluate."""

    def do_test(cfg, model):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {}

    return do_test


def fresh_model() -> torch.nn.Module:
    return build_model(load_config(DEMO_CONFIG, TINY_OVERRIDES))


@pytest.mark.parametrize("name", ["ours.pth", "detrex.pth"])
def test_the_average_replaces_the_weights_unless_switched_off(checkpoints, name):
    folder, state, average = checkpoints
    model = fresh_model()
    assert load_for_evaluation(model, str(folder / name), use_ema=True)
    assert_weights(model, average)
    assert not load_for_evaluation(model, str(folder / name), use_ema=False)
    assert_weights(model, state)


def test_a_checkpoint_without_an_average_loads_its_weights(checkpoints):
    folder, state, _ = checkpoints
    model = fresh_model()
    assert not load_for_evaluation(model, str(folder / "plain.pth"), use_ema=True)
    assert_weights(model, state)


def test_an_average_that_does_not_fit_is_named(checkpoints, tmp_path):
    folder, state, average = checkpoints
    bad = {**average, "decoder.no_such.weight": torch.zeros(2)}
    hooks = {"EMAHook": {"updates": 1, "shadow": bad}}
    torch.save({"model": state, "trainer": {"hooks": hooks}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"EMA weights in .*bad.pth do not fit.*no_such"):
        load_for_evaluation(fresh_model(), str(tmp_path / "bad.pth"))


def test_eval_only_evaluates_the_average(checkpoints, monkeypatch, tmp_path):
    folder, state, average = checkpoints
    evaluated = []
    monkeypatch.setattr(
        runner,
        "do_test",
        lambda cfg, model: evaluated.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    for extra, expected in (([], average), ([OFF], state)):
        argv = ["train_net.py", "--config-file", DEMO_CONFIG, "--eval-only", *TINY_OVERRIDES,
                f"train.init_checkpoint={folder / 'ours.pth'}", f"train.output_dir={tmp_path}",
                *extra]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(REPO_ROOT / "tools" / "train_net.py"), run_name="__main__")
        for name, tensor in expected.items():
            assert torch.equal(evaluated[-1][name], tensor), name


def test_the_predictor_uses_the_average(checkpoints):
    folder, state, average = checkpoints
    predictor = Predictor(DEMO_CONFIG, folder / "ours.pth", overrides=TINY_OVERRIDES)
    assert predictor.uses_ema_weights
    assert_weights(predictor.model, average)
    trained = Predictor(DEMO_CONFIG, folder / "ours.pth", overrides=[*TINY_OVERRIDES, OFF])
    assert not trained.uses_ema_weights
    assert_weights(trained.model, state)


def test_the_figure_commands_use_the_average(checkpoints):
    folder, state, average = checkpoints
    for extra, expected in (([], average), ([OFF], state)):
        args = argparse.Namespace(model=[["ema", DEMO_CONFIG, str(folder / "ours.pth")]],
                                  opts=[*TINY_OVERRIDES, *extra], device="cpu", dataset=None,
                                  coco_json=None, image_root=None)  # fmt: skip
        (loaded,), _ = load_models(args)
        assert_weights(loaded.model, expected)


def test_evaluation_during_training_uses_the_average(monkeypatch, tmp_path):
    """Two iterations with model EMA, evaluated at the end: the evaluated weights are the average
    saved in model_final.pth (the trained ones with the switch off)."""
    evaluated = []
    monkeypatch.setattr(runner, "do_test", recorder(evaluated))
    common = [*TINY_OVERRIDES, "train.max_iter=2", "train.eval_period=2", "train.seed=1",
              "train.model_ema.enabled=True", "train.model_ema.decay=0.5",
              "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0"]  # fmt: skip
    for extra, part in (([], "average"), ([OFF], "model")):
        out = tmp_path / part
        do_train(load_config(DEMO_CONFIG, [*common, f"train.output_dir={out}", *extra]))
        saved = torch.load(out / "model_final.pth", weights_only=True)
        expected = saved["trainer"]["hooks"]["EMAHook"]["shadow"] if part == "average" else {
            k: v for k, v in saved["model"].items() if v.is_floating_point()}  # fmt: skip
        other = saved["model"] if part == "average" else saved["trainer"]["hooks"]["EMAHook"][
            "shadow"]  # fmt: skip
        name = "decoder.class_heads.0.weight"
        assert not torch.equal(expected[name], other[name])  # the two differ after 2 steps
        for key, tensor in expected.items():
            assert torch.equal(evaluated[-1][key].cpu(), tensor), key


def test_input_format_bgr_takes_opencv_arrays(checkpoints):
    """As detectron2's DefaultPredictor: input_format names the arrays' channel order."""
    folder, _, _ = checkpoints
    rgb = Predictor(DEMO_CONFIG, folder / "plain.pth", overrides=TINY_OVERRIDES)
    bgr = Predictor(DEMO_CONFIG, folder / "plain.pth", overrides=TINY_OVERRIDES,
                    input_format="BGR")  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    expected = rgb(image)
    for got in (bgr(np.ascontiguousarray(image[:, :, ::-1])),):
        np.testing.assert_array_equal(got.boxes, expected.boxes)
        np.testing.assert_array_equal(got.scores, expected.scores)
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[:, :, 2] = 255  # red in BGR
    assert bgr.model_input(bgr._as_rgb(red))["image"][:, 0, 0].tolist() == [255, 0, 0]
    assert not np.array_equal(rgb(image[:, :, ::-1].copy()).scores, expected.scores)
    with pytest.raises(ValueError, match="input_format must be 'RGB' or 'BGR', got 'YUV'"):
        Predictor(DEMO_CONFIG, folder / "plain.pth", overrides=TINY_OVERRIDES, input_format="YUV")
