"""A data error inside a DataLoader worker process ends train_net with the same one line as in
the main process, not with the worker's traceback (RANKDETR_TRACEBACK=1 still shows it).

torch re-raises a worker's error in the main process as the original class (or a RuntimeError
when the class cannot be rebuilt from a message alone), with the worker's traceback inside the
message: "Caught FileNotFoundError in DataLoader worker process 0.\\nOriginal Traceback ...".
"""

import os
import sys
import textwrap
from pathlib import Path

import pytest
from torch._utils import ExceptionWrapper

from rankdetr.data.image_io import ImageReadError
from rankdetr.errors import UserError, is_user_error, report_user_errors, user_message
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


# --- torch's re-raised worker errors ------------------------------------------------------


class NeedsTwoArguments(ValueError, UserError):
    """A user error that torch cannot rebuild from the message (it re-raises a RuntimeError)."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")


def reraised_from_worker(error: Exception) -> Exception:
    """`error` as the main process receives it from a DataLoader worker."""
    try:
        raise error
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as reraised:
        return reraised
    raise AssertionError("ExceptionWrapper.reraise() did not raise")


def raising(error: Exception):
    """A main function that fails with `error`."""

    def main():
        raise error

    return main


def exit_message(error: Exception, capsys) -> str:
    """What report_user_errors prints on stderr for `error` (it must exit with status 1)."""
    with pytest.raises(SystemExit) as exited:
        report_user_errors(raising(error))
    assert exited.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "error, message",
    [
        (FileNotFoundError("image file not found: /d/a.png"), "image file not found: /d/a.png"),
        (ImageReadError("image /d/b.jpg is truncated"), "image /d/b.jpg is truncated"),
        (NeedsTwoArguments("/d/c.json", "bad\nbox"), "/d/c.json: bad\nbox"),
    ],
    ids=["builtin", "rankdetr", "not-rebuildable"],
)
def test_a_user_error_from_a_worker_prints_its_own_message(error, message, capsys, monkeypatch):
    monkeypatch.delenv("RANKDETR_TRACEBACK", raising=False)
    reraised = reraised_from_worker(error)
    assert "Original Traceback" in str(reraised)  # what was printed before
    assert is_user_error(reraised) and user_message(reraised) == message
    assert exit_message(reraised, capsys) == f"error: {message}\n"


def test_a_bug_in_a_worker_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("RANKDETR_TRACEBACK", raising=False)
    reraised = reraised_from_worker(ZeroDivisionError("division by zero"))
    assert not is_user_error(reraised)
    with pytest.raises(ZeroDivisionError, match="Original Traceback"):
        report_user_errors(raising(reraised))


def test_with_rankdetr_traceback_the_worker_error_is_raised_whole(monkeypatch):
    monkeypatch.setenv("RANKDETR_TRACEBACK", "1")
    reraised = reraised_from_worker(FileNotFoundError("image file not found: /d/a.png"))
    with pytest.raises(FileNotFoundError, match="(?s)Original Traceback.*/d/a.png"):
        report_user_errors(raising(reraised))


# --- through tools/train_net.py with num_workers=1 ----------------------------------------

# A 4-image COCO file whose first image is missing (registered without the up-front file check,
# as for files that vanish during training or sit on remote storage) or truncated (registered
# with register_coco_format, which only checks that the files exist).
WRAPPER = textwrap.dedent("""
    import functools, runpy, sys
    from pathlib import Path

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from rankdetr.data import register_coco_format
    from rankdetr.data.datasets import load_coco_json_checked
    from rankdetr.data.synthetic import generate_shapes_dataset

    root, problem = Path(sys.argv[1]), sys.argv[2]
    json_file = generate_shapes_dataset(root, "train", 4, seed=3)
    image_root = json_file.parent / "images"
    first = sorted(image_root.iterdir())[0]
    if problem == "missing":
        first.unlink()
        load = functools.partial(
            load_coco_json_checked, json_file, image_root, "my_train", check_image_files=False
        )
        DatasetCatalog.register("my_train", load)
        MetadataCatalog.get("my_train").set(
            json_file=str(json_file), image_root=str(image_root), evaluator_type="coco"
        )
    else:
        first.write_bytes(first.read_bytes()[:100])
        register_coco_format("my_train", json_file, image_root)
    print("BAD_IMAGE", first, flush=True)
    sys.argv = sys.argv[3:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)

TINY = [
    "train.device=cpu",
    "train.max_iter=2",
    "train.eval_period=0",
    "dataloader.evaluator=None",  # no evaluation: not what this checks
    "dataloader.train.dataset.names=my_train",
    "dataloader.train.num_workers=1",
    "dataloader.train.total_batch_size=4",  # every image in the first batch
    "model.num_classes=None",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.num_queries=10",
    "model.num_queries_one2many=20",
    "model.num_detections=10",
]


def train_with_a_bad_image(tmp_path: Path, problem: str, traceback: bool = False):
    """Run train_net on the dataset of WRAPPER; returns (the bad image, the finished process)."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    command = [sys.executable, str(wrapper), str(tmp_path / "data"), problem, str(TRAIN_NET)]
    command += ["--config-file", str(DEMO), *TINY, f"train.output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RANKDETR_TRACEBACK", None)
    if traceback:
        env["RANKDETR_TRACEBACK"] = "1"
    result = run_python(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    bad = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if "BAD_IMAGE" in line]
    assert bad, result.stdout[-2000:] + result.stderr[-2000:]
    return bad[0], result


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_a_bad_image_read_in_a_worker_is_one_line(tmp_path, problem):
    bad_image, result = train_with_a_bad_image(tmp_path, problem)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "worker" not in result.stderr, result.stderr[-3000:]
    # detectron2's training loop logs the error too (console and log.txt): in one line as well.
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    logged = [line for line in result.stdout.splitlines() if "Exception during training" in line]
    assert len(logged) == 1 and bad_image in logged[0], result.stdout[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad_image in errors[0], result.stderr[-3000:]


def test_rankdetr_traceback_shows_the_workers_traceback(tmp_path):
    bad_image, result = train_with_a_bad_image(tmp_path, "missing", traceback=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "in DataLoader worker process" in result.stderr
    assert "read_image" in result.stderr and bad_image in result.stderr
