"""Backbone weights from local files: torchvision, detectron2 .pkl, timm; bad files refused."""

import pickle

import numpy as np
import pytest
import torch
import torchvision

from rankdetr.checkpoint.backbone_weights import (
    CheckpointError,
    load_backbone_weights,
    read_weights_file,
)
from rankdetr.modeling.backbone import ResNetBackbone, TimmBackbone


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_reproduce_torchvision_features(tmp_path, depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    for module in reference.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "resnet.pth")
    backbone = ResNetBackbone(depth=depth).eval()
    load_backbone_weights(backbone, tmp_path / "resnet.pth")
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(image)
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        x = reference.layer1(x)
        expected = []
        for layer in (reference.layer2, reference.layer3, reference.layer4):
            x = layer(x)
            expected.append(x)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_detectron2_pickle_is_read_without_arbitrary_objects(tmp_path):
    backbone = ResNetBackbone(depth=18)
    arrays = {k: v.numpy() + 1.0 for k, v in backbone.state_dict().items()}
    with open(tmp_path / "r18.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    load_backbone_weights(backbone, tmp_path / "r18.pkl")
    name = "res3.0.conv1.weight"
    np.testing.assert_array_equal(backbone.state_dict()[name].numpy(), arrays[name])


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": Exploit()}}, f)
    with pytest.raises(CheckpointError, match="evil.pkl.*refusing to load builtins.print"):
        read_weights_file(tmp_path / "evil.pkl")
    assert "must never run" not in capsys.readouterr().out


def test_truncated_missing_and_mismatched_files_name_the_problem(tmp_path):
    torch.save(ResNetBackbone(depth=18).state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_weights_file(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found: .*absent.pth"):
        read_weights_file(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="lacks .* backbone tensors"):
        load_backbone_weights(ResNetBackbone(depth=50), tmp_path / "good.pth")


@pytest.mark.slow
def test_timm_classification_checkpoint_loads_into_the_feature_backbone(tmp_path):
    import timm

    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "swin.pth")
    backbone = TimmBackbone(model_name="swin_tiny_patch4_window7_224")
    load_backbone_weights(backbone, tmp_path / "swin.pth")
    ours = backbone.body.state_dict()["layers_1.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(ours, full.state_dict()["layers.1.blocks.0.attn.qkv.weight"])
