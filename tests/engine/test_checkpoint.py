"""SafeCheckpointer: atomic saves (a crash or SIGKILL mid-save leaves the previous checkpoint),
resume from the newest complete checkpoint, and loading that never runs code from the file."""

import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.file_io import PathManager

import rankdetr.engine.checkpoint as checkpoint_module
from rankdetr.engine.checkpoint import (
    CheckpointError,
    SafeCheckpointer,
    is_complete_checkpoint,
    to_weights_only,
)
from rankdetr.engine.hooks import EMAHook, SeedHook
from rankdetr.engine.trainer import RankDETRTrainer

ROOT = Path(__file__).resolve().parents[2]


def small_model(value: float = 0.0) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def save_model(directory: Path, name: str, value: float) -> None:
    SafeCheckpointer(small_model(value), str(directory)).save(name, iteration=int(value))


def loaded_value(path) -> float:
    model = small_model(-1.0)
    SafeCheckpointer(model).load(str(path))
    return model.weight[0, 0].item()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- atomic writes ------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_model(tmp_path, "model_0000003", 3.0)

    def write_half_then_fail(data, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")  # what a crashed writer leaves
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", write_half_then_fail)
    with pytest.raises(CheckpointError, match=r"cannot write .*model_0000007\.pth: disk full"):
        save_model(tmp_path, "model_0000007", 7.0)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000003.pth"]
    checkpointer = SafeCheckpointer(small_model(), str(tmp_path))
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")
    assert loaded_value(checkpointer.get_checkpoint_file()) == 3.0


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    import rankdetr.engine.checkpoint as module

    real_save = torch.save

    def save_then_die(data, handle):
        real_save(data, handle)
        handle.flush()
        handle.truncate(handle.tell() // 2)  # the process dies with half the file written
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 7.0)
    module.torch.save = save_then_die
    module.SafeCheckpointer(model, sys.argv[1]).save("model_0000007")
    """)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    save_model(tmp_path, "model_0000003", 3.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env, cwd=ROOT, capture_output=True
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and not is_complete_checkpoint(leftovers[0])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    checkpointer = SafeCheckpointer(small_model(), str(tmp_path))
    assert checkpointer.has_checkpoint()
    assert loaded_value(checkpointer.get_checkpoint_file()) == 3.0
    save_model(tmp_path, "model_0000011", 11.0)  # the next save clears the leftover
    assert not leftovers[0].exists()
    assert loaded_value(checkpointer.get_checkpoint_file()) == 11.0


# --- choosing the checkpoint to resume from -----------------------------------------------


def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, caplog):
    for value in (3, 7, 11):
        save_model(tmp_path, f"model_{value:07d}", float(value))
    truncate(tmp_path / "model_0000011.pth")
    checkpointer = SafeCheckpointer(small_model(), str(tmp_path))
    with caplog.at_level(logging.WARNING):
        chosen = checkpointer.get_checkpoint_file()
    assert chosen == str(tmp_path / "model_0000007.pth")
    assert "model_0000011.pth" in caplog.text and "incomplete or corrupt" in caplog.text
    assert loaded_value(chosen) == 7.0


def test_resume_falls_back_when_the_pointer_names_a_missing_file_or_is_missing(tmp_path, caplog):
    for value in (3, 7):
        save_model(tmp_path, f"model_{value:07d}", float(value))
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    checkpointer = SafeCheckpointer(small_model(), str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000007.pth")
    assert "model_0000099.pth" in caplog.text and "is missing" in caplog.text
    (tmp_path / "last_checkpoint").unlink()
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000007.pth")
    save_model(tmp_path, "model_final", 12.0)
    (tmp_path / "last_checkpoint").unlink()
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_final.pth")


def test_no_complete_checkpoint_means_no_resume(tmp_path):
    checkpointer = SafeCheckpointer(small_model(), str(tmp_path / "absent"))
    assert not checkpointer.has_checkpoint()
    save_model(tmp_path, "model_0000003", 3.0)
    truncate(tmp_path / "model_0000003.pth", keep=0.9)
    assert not SafeCheckpointer(small_model(), str(tmp_path)).has_checkpoint()


# --- loading safely -----------------------------------------------------------------------


class MakesADirectory:
    """Unpickling this runs os.mkdir(path): a stand-in for arbitrary code in a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    payload = {"model": {"weight": torch.zeros(2)}, "extra": MakesADirectory(marker)}
    torch.save(payload, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"model": {"w": np.zeros(2)}, "x": MakesADirectory(marker)}, handle)
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(CheckpointError, match=name):
            SafeCheckpointer(small_model()).load(str(tmp_path / name))
        assert not marker.exists()
    pickle.loads(pickle.dumps(MakesADirectory(marker)))  # the payload is live: it does run
    assert marker.is_dir()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_is_an_error_naming_it(tmp_path, damage):
    save_model(tmp_path, "model_0000003", 3.0)
    path = tmp_path / "model_0000003.pth"
    if damage == "truncated":
        truncate(path, keep=0.7)
    else:
        path.write_bytes(b"" if damage == "empty" else os.urandom(300))
    with pytest.raises(CheckpointError, match=re.escape(f"cannot load checkpoint {path}")):
        SafeCheckpointer(small_model()).load(str(path))


def test_missing_file_is_named_and_a_failed_download_too(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        SafeCheckpointer(small_model()).load(str(tmp_path / "nope.pth"))

    def offline(path, **kwargs):  # what detectron2's PathManager raises without a network
        raise OSError("Name or service not known")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    with pytest.raises(CheckpointError, match="cannot download https://example.com/model.pth"):
        SafeCheckpointer(small_model()).load("https://example.com/model.pth")


def test_detectron2_pickles_load_through_the_safe_unpickler(tmp_path):
    weights = {"weight": np.full((2, 3), 5.0, np.float32), "bias": np.full(2, 5.0, np.float32)}
    with open(tmp_path / "d2.pkl", "wb") as handle:
        pickle.dump({"model": weights, "__author__": "test"}, handle)
    assert loaded_value(tmp_path / "d2.pkl") == 5.0


# --- what a training checkpoint holds -----------------------------------------------------


def test_to_weights_only_converts_numpy_and_refuses_other_objects():
    converted = to_weights_only({"a": np.arange(3), "b": [np.float32(1.5), (np.int64(2), "s")]})
    assert torch.equal(converted["a"], torch.arange(3))
    assert converted["b"] == [1.5, (2, "s")] and type(converted["b"][0]) is float
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]\[1\] is a .*MakesADirectory"):
        to_weights_only({"x": [1, MakesADirectory("p")]})


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": ((self.weight * batch - 2) ** 2).sum()}


class NumpyStateHook(HookBase):
    """A hook whose state holds NumPy values, as third-party hooks may."""

    def state_dict(self):
        return {"counts": np.array([1, 2]), "scale": np.float64(0.5)}


def test_a_training_checkpoint_loads_with_weights_only(tmp_path):
    model = Quadratic()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = RankDETRTrainer(model, [torch.ones(3)] * 4, optimizer)
    trainer.register_hooks([SeedHook(3), EMAHook(model, decay=0.9), NumpyStateHook()])
    trainer.train(0, 2)
    SafeCheckpointer(model, str(tmp_path), trainer=trainer).save("model_0000001", iteration=1)
    data = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    state = data["trainer"]
    assert data["iteration"] == 1 and state["iteration"] == 2
    assert state["hooks"]["SeedHook"] == {"seed": 3}
    assert state["hooks"]["EMAHook"]["updates"] == 2
    assert torch.equal(state["hooks"]["NumpyStateHook"]["counts"], torch.tensor([1, 2]))
    assert torch.is_tensor(state["optimizer"]["state"][0]["exp_avg"])
