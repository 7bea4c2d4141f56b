"""Every shipped config loads and instantiates: its model, optimiser, schedule and mapper."""

from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from rankdetr.modeling.dino import DINO
from rankdetr.modeling.rank_options import RankOptions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FULL_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.py") if p.parent.name not in ("common", "data", "models")
)
# The last model built, reused by the next config when that builds the same (configs sharing a
# model tree are neighbours in sorted order). Only one is kept: holding every distinct model
# (R50 ablations, Swin-L variants) took over 10 GB.
_built: dict = {}


def test_there_are_configs():
    assert len(FULL_CONFIGS) >= 40


@pytest.mark.parametrize("path", FULL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_instantiates(path):
    cfg = LazyConfig.load(str(path))
    for node in ("model", "optimizer", "lr_multiplier", "dataloader", "train"):
        assert node in cfg, f"{path} lacks {node}"
    rank = instantiate(cfg.model.rank)
    assert isinstance(rank, RankOptions)
    if cfg.model.num_classes is None:
        cfg.model.num_classes = 80
    key = (cfg.model._target_, LazyConfig.to_py(cfg.model.backbone),
           LazyConfig.to_py(cfg.model.neck), rank, cfg.model.embed_dim,
           cfg.model.encoder_layers)  # fmt: skip
    if key not in _built:
        _built.clear()
        _built[key] = instantiate_without_init(cfg.model)
    model = _built[key]
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.Optimizer)
    if path.parent.name != "demo" and isinstance(model, DINO):
        assert_dino_learning_rates(optimizer, model)
    elif path.parent.name != "demo":
        assert_release_learning_rates(optimizer, model)
    assert instantiate(cfg.lr_multiplier)(0.0) > 0
    instantiate(cfg.dataloader.train.mapper)
    assert cfg.train.max_iter > 0 and cfg.train.output_dir


def instantiate_without_init(model_cfg) -> torch.nn.Module:
    """The model built on the meta device, then given uninitialised CPU memory: the same modules,
    names and parameters as `instantiate`, without the seconds that random initialisation of the
    R50 / Swin-L models costs (their values are not what this test checks)."""
    with torch.device("meta"):
        model = instantiate(model_cfg)
    return model.to_empty(device="cpu")


def assert_release_learning_rates(optimizer, model):
    """The release's recipe (its train_net.py, not its config): AdamW at 2e-4, and 2e-5 for the
    backbone, the sampling offsets and the reference points; weight decay 1e-4."""
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    slow = ("backbone.", "sampling_offsets", "reference_points")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        expected = 2e-5 if any(key in name for key in slow) else 2e-4
        assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)


def assert_dino_learning_rates(optimizer, model):
    """DINO's recipe (detrex's dino_r50_4scale_12ep.py): AdamW at 1e-4, the backbone at 1e-5
    (sampling offsets at the full rate); weight decay 1e-4."""
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = 1e-5 if name.startswith("backbone.") else 1e-4
            assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)


def test_dino_configs_hold_table_3_and_the_recipe():
    """The DINO rows: 900 queries, dn_number 100, noise 0.5 / 1.0, loss weights (1, 5, 2),
    matching costs (2, 5, 2), rank components off for DINO and all on for Rank-DINO, epochs and
    lr drops as detrex's."""
    expected_iters = {
        "12ep": (90000, 11 / 12),
        "24ep": (180000, 20 / 24),
        "36ep": (270000, 30 / 36),
    }
    paths = sorted(CONFIGS.glob("dino/*.py")) + sorted(CONFIGS.glob("rank_dino/*.py"))
    assert len(paths) == 10
    for path in paths:
        cfg = LazyConfig.load(str(path))
        assert cfg.model._target_ is DINO, path
        assert (cfg.model.num_queries, cfg.model.dn_number) == (900, 100)
        assert (cfg.model.label_noise_ratio, cfg.model.box_noise_scale) == (0.5, 1.0)
        assert dict(cfg.model.loss_weights) == {"class": 1.0, "bbox": 5.0, "giou": 2.0}
        assert dict(cfg.model.matching_costs) == {"class": 2.0, "bbox": 5.0, "giou": 2.0}
        rank = instantiate(cfg.model.rank)
        on = path.parent.name == "rank_dino"
        assert (rank.rch, rank.qrl, rank.gcl, rank.hmc) == (on, on, on, on), path
        iters, drop = expected_iters[path.stem.rsplit("_", 1)[1]]
        assert cfg.train.max_iter == iters
        assert cfg.lr_multiplier.drop_fraction == pytest.approx(drop)
        assert cfg.train.output_dir.endswith(path.stem)
