"""`train.init_checkpoint`: the R50 configs start from detectron2's ImageNet R-50 as detrex does,
resolved by detectron2's PathManager; without a network the error says so and how to pass a local
file; ImageNet files of the backbone alone (detectron2 ResNet .pkl, Microsoft's Swin) load into
the backbone. Nothing here downloads: URLs are unresolvable or PathManager is replaced."""

import pickle
import runpy
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from detectron2.utils.file_io import PathManager

from rankdetr.engine.checkpoint import CheckpointError, SafeCheckpointer
from rankdetr.engine.runner import build_model, load_config
from tests.modeling.test_swin import detectron2_layout

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEMO = str(CONFIGS / "demo" / "rank_detr_r18_shapes.py")
R50 = str(CONFIGS / "rank_detr" / "rank_detr_r50_12ep.py")
SWIN_T = str(CONFIGS / "rank_detr" / "rank_detr_swin_t_12ep.py")
IMAGENET_R50 = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
R50_CONFIGS = sorted(
    [*(CONFIGS / "rank_detr").glob("rank_detr_r50_*.py"),
     *(CONFIGS / "h_detr").glob("h_detr_r50_*.py"), *(CONFIGS / "ablations").glob("*.py")]
)  # fmt: skip


@pytest.mark.parametrize("config", R50_CONFIGS, ids=lambda path: path.stem)
def test_r50_configs_start_from_detrex_imagenet_r50(config):
    assert load_config(str(config), []).train.init_checkpoint == IMAGENET_R50


def test_the_demo_trains_from_scratch():
    assert load_config(DEMO, []).train.init_checkpoint == ""


def fake_imagenet_r50(model: torch.nn.Module, path: Path) -> dict[str, np.ndarray]:
    """A file in the layout of detectron2's ImageNetPretrained/torchvision/R-50.pkl (detectron2
    names without a prefix, NumPy arrays, "__author__"), with values the model does not have."""
    rng = np.random.default_rng(0)
    weights = {
        name.removeprefix("backbone."): rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        for name, tensor in model.state_dict().items()
        if name.startswith("backbone.")
    }
    with open(path, "wb") as handle:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True},
                    handle)  # fmt: skip
    return weights


@pytest.fixture(scope="module")
def r50_model():
    return build_model(load_config(R50, ["model.num_classes=80", "train.device=cpu"]))


def test_the_default_url_is_resolved_by_detectron2_path_manager_into_the_backbone(
    r50_model, tmp_path, monkeypatch
):
    local = tmp_path / "R-50.pkl"
    weights = fake_imagenet_r50(r50_model, local)
    asked = []
    monkeypatch.setattr(PathManager, "get_local_path",
                        lambda path, **kwargs: asked.append(path) or str(local))  # fmt: skip
    before = {k: v.clone() for k, v in r50_model.state_dict().items()}
    cfg = load_config(R50, [])
    SafeCheckpointer(r50_model).resume_or_load(cfg.train.init_checkpoint, resume=False)
    assert asked == [IMAGENET_R50]
    for name, tensor in r50_model.state_dict().items():
        if name.startswith("backbone."):
            assert np.array_equal(tensor.numpy(), weights[name.removeprefix("backbone.")]), name
        else:
            assert torch.equal(tensor, before[name]), name  # the detector keeps its init


def test_backbone_weights_of_another_depth_are_refused_naming_the_file(tmp_path):
    """The demo's ResNet-18 is not the R-50 of the file: an error, not a silent partial load."""
    r50 = build_model(load_config(R50, ["model.num_classes=80", "train.device=cpu"]))
    fake_imagenet_r50(r50, tmp_path / "R-50.pkl")
    demo = build_model(load_config(DEMO, []))
    with pytest.raises(CheckpointError, match=r"R-50.pkl.*(lacks|shape)"):
        SafeCheckpointer(demo).resume_or_load(str(tmp_path / "R-50.pkl"), resume=False)


def test_offline_the_error_says_the_download_failed_and_how_to_pass_a_local_file():
    model = build_model(load_config(DEMO, []))
    url = "https://rankdetr-offline-test.invalid/ImageNetPretrained/R-50.pkl"  # never resolves
    with pytest.raises(CheckpointError) as error:
        SafeCheckpointer(model).resume_or_load(url, resume=False)
    message = str(error.value)
    assert f"cannot download {url}" in message
    assert "train.init_checkpoint=/path/to/R-50.pkl" in message
    assert 'train.init_checkpoint=""' in message


def test_train_net_without_network_ends_in_one_line(monkeypatch, capsys, tmp_path):
    """The R50 config's default as it fails on a machine without internet (PathManager's own
    error replaced by what urllib raises there)."""

    def offline(path, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    argv = ["train_net.py", "--config-file", R50, "--eval-only", "model.num_classes=80",
            "train.device=cpu", f"train.output_dir={tmp_path}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "tools" / "train_net.py"), run_name="__main__")
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()  # (torch may warn about CUDA first)
    assert (
        lines[-1].startswith(f"error: cannot download {IMAGENET_R50}") and "Traceback" not in lines
    )
    assert "train.init_checkpoint=/path/to/R-50.pkl" in lines[-1]


def test_swin_imagenet_weights_as_init_checkpoint_load_into_the_swin_t_backbone(tmp_path):
    """Microsoft's ImageNet Swin-T file given as train.init_checkpoint of the Swin-T config:
    every backbone weight comes from the file (its output norms, absent there, keep their
    initialisation); the rest of the detector is untouched."""
    model = build_model(load_config(SWIN_T, ["model.num_classes=80", "train.device=cpu"]))
    source = model.backbone
    torch.manual_seed(0)
    imagenet = {k: v + torch.randn_like(v) if v.is_floating_point() else v
                for k, v in detectron2_layout(source, classifier=True).items()}  # fmt: skip
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": imagenet}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SafeCheckpointer(model).resume_or_load(str(path), resume=False)
    weight = "backbone.layers.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(model.state_dict()[weight], before[weight])
    for name, tensor in model.state_dict().items():
        inner = name.removeprefix("backbone.")
        if name.startswith("backbone.") and not inner.startswith("norm") and inner in imagenet:
            assert torch.equal(tensor, imagenet[inner]), name
        elif not name.startswith("backbone."):
            assert torch.equal(tensor, before[name]), name
