"""Proof of fidelity of the DINO base: DINO's own outputs (detrex `projects/dino`) on a tiny
configuration.

`../shared/reference/dino-tiny/` (its README lists the sizes and entries) holds a DINO state dict
in detrex's names and what DINO computed with it. The state dict goes through our converter into
our :class:`DINO` built with the same sizes, strictly, and:

* `eval` (float64): every decoder layer's logits and boxes, and the detections, agree to float64
  rounding;
* `train_nodn` (float64, denoising off): every loss term agrees to float64 rounding, and every
  parameter's gradient norm equals the reference's after one float32 rounding (it stored them
  as float32);
* `train_dn` (float32, DINO's denoising code builds its queries in float32): with the denoising
  queries DINO drew injected in place of our own draws, every loss term (the `_dn` ones included)
  and every gradient norm agree to float32 rounding.

The reference's gradients are of sum_k loss_weights[k] * losses[k], where its `losses` already
carry the weights once (DINO's forward multiplies them in; the harness that recorded the fixture
applied `loss_weights` again when it summed them). The tests backpropagate the same combination
of our loss terms, so every term's gradient is still compared.
"""

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from rankdetr.checkpoint.dino import convert_dino_state_dict, is_dino_checkpoint
from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.denoising import DenoisingQueries
from rankdetr.modeling.dino import DINO
from rankdetr.modeling.neck import ChannelMapper
from tests.shared_reference import load_shared_reference

RTOL = 1e-10  # float64 rounding through a few hundred operations
# float32 rounding through the same: the float32 runs differ by summation order alone (seen:
# losses <= 1.2e-7, gradient norms <= 4.3e-7 relative).
RTOL_FLOAT32 = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return load_shared_reference("dino-tiny/dino_tiny_fixture.pth")


def build_model(config: dict) -> DINO:
    """Our DINO with the fixture's sizes (ResNet-18 at quarter width, 2 + 3 layers, 12 queries,
    5 classes, dn_number 6)."""
    backbone = ResNetBackbone(depth=config["depth"], width=config["width"], freeze_at=1)
    neck = ChannelMapper(
        in_channels=backbone.out_channels,
        out_channels=config["embed_dim"],
        num_extra_levels=config["num_levels"] - len(backbone.out_channels),
        norm_groups=config["norm_groups"],
    )
    return DINO(
        backbone=backbone,
        neck=neck,
        num_classes=config["num_classes"],
        num_queries=config["num_queries"],
        embed_dim=config["embed_dim"],
        num_heads=config["num_heads"],
        num_points=config["num_points"],
        ffn_dim=config["ffn_dim"],
        encoder_layers=config["encoder_layers"],
        decoder_layers=config["decoder_layers"],
        dn_number=config["dn_number"],
        label_noise_ratio=config["label_noise_ratio"],
        box_noise_scale=config["box_noise_scale"],
        num_detections=config["num_queries"] * config["num_classes"],
    )


@pytest.fixture(scope="module")
def model(fixture):
    model = build_model(fixture["config"])
    assert is_dino_checkpoint(fixture["state_dict"])
    converted = convert_dino_state_dict(fixture["state_dict"])  # depth read from the names
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


class RecordedDenoising:
    """Stands in for the model's denoising builder: DINO's recorded queries instead of new draws.

    The label queries are made by our label embedding from the labels DINO drew (each recorded
    row is one row of its label table, found exactly), so that the label embedding's gradient is
    compared too."""

    def __init__(self, fixture):
        recorded = fixture["train_dn"]["dn_queries"]
        table = fixture["state_dict"]["label_enc.weight"]
        same = (recorded["input_query_label"][:, :, None, :] == table[None, None]).all(-1)
        assert (same.sum(-1) == 1).all(), "every recorded label query is one label's embedding"
        self.labels = same.float().argmax(-1)
        self.box_logits = recorded["input_query_bbox"]
        self.attn_mask = recorded["attn_mask"]
        self.num_groups = recorded["dn_meta"]["dn_num"]
        self.group_size = recorded["dn_meta"]["single_padding"]
        self.calls = 0

    def __call__(self, targets, label_embedding, num_matching) -> DenoisingQueries:
        self.calls += 1
        assert self.attn_mask.shape[0] == self.labels.shape[1] + num_matching
        return DenoisingQueries(
            label_embedding(self.labels),
            self.box_logits,
            self.attn_mask,
            self.num_groups,
            self.group_size,
        )


def weighted_again(losses: dict, weights: dict) -> torch.Tensor:
    """sum_k weights[k] * losses[k], what the reference backpropagated (module docstring)."""
    assert sorted(losses) == sorted(weights)
    return sum(value * weights[name] for name, value in losses.items())


def assert_gradient_norms_match(model, reference_norms: dict, rtol: float | None):
    """Every parameter's gradient norm against the reference's: within `rtol`, or, for
    rtol=None, equal after rounding ours to float32 as the reference stored them (one float32
    spacing)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norms = convert_dino_state_dict({n: torch.tensor(v) for n, v in reference_norms.items()})
    assert sorted(grads) == sorted(norms)  # the same parameters train (stem frozen in both)
    for name, norm in norms.items():
        ours = grads[name].norm().item()
        if rtol is None:
            stored = np.float32(norm.item())
            assert abs(float(np.float32(ours)) - float(stored)) <= np.spacing(stored), name
        else:
            assert abs(ours - norm.item()) <= rtol * norm.item(), name


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
        # float32 boxes in pixels of a 160-px image: each side rounds to float32 at most twice.
        boxes = instances.pred_boxes.tensor
        assert boxes.dtype == theirs["boxes"].dtype == torch.float32
        torch.testing.assert_close(boxes, theirs["boxes"], rtol=0, atol=2 * 2.0**-16)


def test_losses_and_gradients_match_without_denoising(fixture, model, monkeypatch):
    reference = fixture["train_nodn"]
    monkeypatch.setattr(model.denoising, "dn_number", 0)
    model.train()
    model.zero_grad()
    losses = model(batched_inputs(fixture))
    assert sorted(losses) == sorted(reference["losses"])
    for name, value in reference["losses"].items():
        ours = losses[name].detach()
        if name.split("_")[2:3] == ["dn"]:  # no denoising queries: DINO's zero terms
            assert ours.item() == value.item() == 0.0, name
            continue
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, value, rtol=RTOL, atol=0, msg=name)
    weighted_again(losses, reference["loss_weights"]).backward()
    assert_gradient_norms_match(model, reference["grad_norms"], None)
    # The label embeddings get an exact zero gradient (they must take part for DDP).
    assert model.label_embedding.weight.grad.abs().max().item() == 0.0


def test_losses_and_gradients_match_with_the_recorded_denoising_queries(fixture, model):
    reference = fixture["train_dn"]
    model = model.float()
    recorded = RecordedDenoising(fixture)
    model.denoising, own_builder = recorded, model.denoising
    try:
        model.train()
        model.zero_grad()
        losses = model(batched_inputs(fixture))
        assert recorded.calls == 1
        assert sorted(losses) == sorted(reference["losses"])
        assert losses["loss_class_dn"].item() > 0 and losses["loss_giou_dn_0"].item() > 0
        for name, value in reference["losses"].items():
            ours = losses[name].detach()
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, value, rtol=RTOL_FLOAT32, atol=0, msg=name)
        weighted_again(losses, reference["loss_weights"]).backward()
        assert_gradient_norms_match(model, reference["grad_norms"], RTOL_FLOAT32)
        assert model.label_embedding.weight.grad.abs().max().item() > 0
    finally:
        model.denoising = own_builder
        model.double()


def test_the_recorded_denoising_layout_is_ours(fixture):
    """DINO's recorded mask and group layout are what our builder makes for the same targets."""
    from rankdetr.modeling.denoising import denoising_attention_mask

    recorded = fixture["train_dn"]["dn_queries"]
    config = fixture["config"]
    most = max(len(sample["labels"]) for sample in fixture["inputs"])
    groups = config["dn_number"] // most
    assert recorded["dn_meta"]["dn_num"] == groups
    assert recorded["dn_meta"]["single_padding"] == 2 * most
    mask = denoising_attention_mask(groups, 2 * most, config["num_queries"])
    assert torch.equal(mask, recorded["attn_mask"])


def test_the_converter_refuses_what_it_cannot_map(fixture):
    state_dict = dict(fixture["state_dict"])
    state_dict["transformer.pos_trans.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="transformer.pos_trans.weight.*release checkpoint"):
        convert_dino_state_dict(state_dict)
    state_dict = dict(fixture["state_dict"])
    state_dict["class_embed.0.bias"] = state_dict["class_embed.0.bias"] + 1
    with pytest.raises(ValueError, match="class_embed.0.bias differs"):
        convert_dino_state_dict(state_dict)
    with pytest.raises(ValueError, match="3 decoder layers"):
        convert_dino_state_dict(fixture["state_dict"], num_decoder_layers=6)
