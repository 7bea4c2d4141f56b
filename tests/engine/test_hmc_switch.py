"""A real do_train run switches the matcher to HMC at `rank.hmc_start` of training, and a run
resumed in the middle switches at the same iteration (the progress comes from the iteration)."""

from pathlib import Path

import pytest

from rankdetr.data import register_shapes_dataset
from rankdetr.engine.runner import do_train, load_config
from rankdetr.modeling.rank_detr import RankDETR

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py")


class Interrupted(Exception):
    pass


def record_matcher_state(monkeypatch, stop_at_call=None):
    """Each training forward appends whether the model's matcher uses HMC; the call with index
    `stop_at_call` raises after recording (a crash mid-run)."""
    seen = []
    original = RankDETR.forward

    def forward(self, batched_inputs):
        if self.training:
            seen.append(self.criterion.matcher.use_high_order)
            if stop_at_call is not None and len(seen) - 1 == stop_at_call:
                raise Interrupted
        return original(self, batched_inputs)

    monkeypatch.setattr(RankDETR, "forward", forward)
    return seen


def overrides(output_dir):
    return [
        "train.max_iter=4",
        "model.rank.hmc_start=0.5",
        "train.eval_period=0",
        "dataloader.evaluator=None",  # no evaluation: not what this checks
        "train.log_period=1",
        "train.checkpointer.period=2",
        f"train.output_dir={output_dir}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "model.num_queries=10",
        "model.num_queries_one2many=20",
        "model.num_detections=10",
    ]


@pytest.mark.usefixtures("isolated_catalogs")
def test_do_train_switches_to_hmc_at_hmc_start_also_after_resume(tmp_path, monkeypatch):
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 8, "val": 2})
    seen = record_matcher_state(monkeypatch)
    do_train(load_config(DEMO, overrides(tmp_path / "full")))
    assert seen == [False, False, True, True]  # iterations 0..3, progress 0, .25, .5, .75

    interrupted = tmp_path / "interrupted"
    record_matcher_state(monkeypatch, stop_at_call=2)
    with pytest.raises(Interrupted):
        do_train(load_config(DEMO, overrides(interrupted)))
    assert (interrupted / "model_0000001.pth").is_file()
    resumed = record_matcher_state(monkeypatch)
    do_train(load_config(DEMO, overrides(interrupted)), resume=True)
    assert resumed == [True, True]  # iterations 2 and 3
