"""Proof of fidelity: the original release's own outputs on a tiny configuration.

`../shared/reference/release-tiny/` holds what the original Rank-DETR release computed in float64
(its README lists the sizes and entries). Its state dict goes through our converter (the decoder
depth read from the checkpoint) into our model built with the same sizes, strictly; the same
inputs run in float64, and every decoder layer's one-to-one logits and boxes, the detections,
every loss term with HMC off and on, and the gradients agree to float64 rounding.

Two entries were stored by the reference in float32, and are compared at that precision (one
float32 rounding, not a looser tolerance): the detection boxes (detectron2's `Boxes` holds
float32) and the gradient norms (float32 roundings of float64 norms). The whole float64
gradients of every tensor with at most 20,000 values are compared at float64 rounding.
"""

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from rankdetr.checkpoint import convert_release_state_dict, describe_release_checkpoint
from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions
from tests.shared_reference import load_shared_reference

RTOL = 1e-10  # float64 rounding through a few hundred operations


@pytest.fixture(scope="module")
def fixture():
    return load_shared_reference("release-tiny/release_tiny_fixture.pth")


def build_model(config: dict) -> RankDETR:
    """Our model with the fixture's sizes (ResNet-18 at quarter width, 2 + 3 layers, 12 + 36
    queries, k = 3, RCH, QRL, GCL, HMC from 67,500 / 90,000 of training)."""
    backbone = ResNetBackbone(depth=config["depth"], width=config["width"], freeze_at=1)
    neck = ChannelMapper(
        in_channels=backbone.out_channels,
        out_channels=config["embed_dim"],
        num_extra_levels=config["num_levels"] - len(backbone.out_channels),
        norm_groups=config["norm_groups"],
    )
    rank = RankOptions(hmc_start=config["hmc_change_iter"] / config["max_iter"])
    return RankDETR(
        backbone=backbone,
        neck=neck,
        num_classes=config["num_classes"],
        rank=rank,
        num_queries=config["num_queries"],
        num_queries_one2many=config["num_queries_one2many"],
        one2many_repeats=config["one2many_repeats"],
        embed_dim=config["embed_dim"],
        num_heads=config["num_heads"],
        num_points=config["num_points"],
        ffn_dim=config["ffn_dim"],
        encoder_layers=config["encoder_layers"],
        decoder_layers=config["decoder_layers"],
        num_detections=config["num_queries"] * config["num_classes"],
    )


@pytest.fixture(scope="module")
def model(fixture):
    model = build_model(fixture["config"])
    converted = convert_release_state_dict(fixture["state_dict"])  # depth read from the names
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.double()


def batched_inputs(fixture) -> list[dict]:
    inputs = []
    for sample in fixture["inputs"]:
        instances = Instances(tuple(sample["image"].shape[-2:]))
        instances.gt_boxes = Boxes(sample["boxes"])
        instances.gt_classes = sample["labels"]
        inputs.append({"image": sample["image"], "instances": instances})
    return inputs


def our_loss_name(release_name: str) -> str:
    """`loss_bbox_1_one2many` (release) -> `o2m_loss_bbox_1` (ours)."""
    if release_name.endswith("_one2many"):
        return "o2m_" + release_name[: -len("_one2many")]
    return release_name


def test_the_converter_reads_the_sizes_from_the_checkpoint(fixture):
    sizes = describe_release_checkpoint(fixture["state_dict"])
    config = fixture["config"]
    assert sizes == {
        "backbone": "resnet",
        "encoder_layers": config["encoder_layers"],
        "decoder_layers": config["decoder_layers"],
        "num_classes": config["num_classes"],
        "total_queries": config["num_queries"] + config["num_queries_one2many"],
        "rch": True,
        "qrl": True,
    }


def test_every_decoder_layer_and_the_detections_match(fixture, model):
    reference = fixture["eval"]
    model.eval()
    with torch.no_grad():
        layers = model.forward_layers(batched_inputs(fixture))
        detections = model(batched_inputs(fixture))
    assert len(layers["logits"]) == len(reference["logits"]) == 3
    for ours, theirs in zip(layers["logits"], reference["logits"]):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL)
    for ours, theirs in zip(layers["boxes"], reference["boxes"]):
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL)
    for ours, theirs in zip(detections, reference["detections"]):
        instances = ours["instances"]
        torch.testing.assert_close(instances.scores, theirs["scores"], rtol=RTOL, atol=RTOL)
        assert instances.pred_classes.tolist() == theirs["classes"].tolist()
        # float32 boxes in pixels of a 160-px image: one float32 rounding is at most 2^-17 px
        # per rounding step; both sides round twice at most.
        boxes = instances.pred_boxes.tensor
        assert boxes.dtype == theirs["boxes"].dtype == torch.float32
        torch.testing.assert_close(boxes, theirs["boxes"], rtol=0, atol=2 * 2.0**-16)


@pytest.mark.parametrize("hmc", ["hmc_off", "hmc_on"])
def test_losses_and_gradients_match_with_hmc_off_and_on(fixture, model, hmc):
    config, reference = fixture["config"], fixture["train"][hmc]
    iteration = -1 if hmc == "hmc_off" else config["hmc_change_iter"]
    model.train()
    model.zero_grad()
    model.set_training_progress(iteration / config["max_iter"])
    assert model.criterion.matcher.use_high_order == (hmc == "hmc_on")
    losses = model(batched_inputs(fixture))
    assert sorted(losses) == sorted(our_loss_name(name) for name in reference["losses"])
    for name, value in reference["losses"].items():
        ours = losses[our_loss_name(name)]
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours.detach(), value, rtol=RTOL, atol=0, msg=name)
    sum(losses.values()).backward()

    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norms = convert_release_state_dict(
        {name: torch.tensor(v) for name, v in reference["grad_norms"].items()}
    )
    assert sorted(grads) == sorted(norms)  # the same parameters train (stem frozen in both)
    for name, norm in norms.items():
        stored = np.float32(norm.item())
        ours = np.float32(grads[name].norm().item())
        assert abs(float(ours) - float(stored)) <= np.spacing(stored), name
    whole = convert_release_state_dict(reference["grads"])
    assert len(whole) > 100
    for name, grad in whole.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=RTOL * scale, msg=name)


def test_hmc_changes_the_reference_losses(fixture):
    """The two training entries differ, so the HMC test above can tell the switch apart."""
    off, on = (fixture["train"][k]["losses"] for k in ("hmc_off", "hmc_on"))
    assert abs(off["loss_class"] - on["loss_class"]) > 1e-3
