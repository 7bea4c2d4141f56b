"""Rank-DETR's components on the DINO base, through the DINO demo config (a real LazyConfig tree).

* every combination of the four rank flags trains one step (finite losses, gradients reach every
  trained parameter) and infers;
* the matching queries never depend on the denoising queries (DINO's attention mask), with the
  rank components on or off;
* the denoising queries are tied to their targets: sorting the matching queries (RCH / QRL)
  leaves every denoising output where it was, and RCH biases touch matching queries only;
* the flags reach DINO's decoder, criterion and matcher.
"""

import itertools
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from rankdetr.modeling.dino import DINO
from rankdetr.modeling.dino_decoder import DINODecoder
from tests.modeling.test_wiring import batch

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo" / "dino_r18_shapes.py"
FLAGS = ("rch", "qrl", "gcl", "hmc")


def build(*overrides: str, seed: int = 0) -> DINO:
    """The DINO demo model, smaller (20 queries, dn_number 4), with `model.`-relative overrides."""
    cfg = LazyConfig.load(str(DEMO))
    cfg.model.num_classes = 5
    cfg.model.num_queries = 20
    cfg.model.num_detections = 20
    cfg.model.dn_number = 4
    cfg = LazyConfig.apply_overrides(cfg, [f"model.{o}" for o in overrides])
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    assert isinstance(model, DINO)
    return model


def flag_id(flags) -> str:
    return "-".join(f"{name}{int(on)}" for name, on in zip(FLAGS, flags))


@pytest.mark.parametrize("flags", list(itertools.product((False, True), repeat=4)), ids=flag_id)
def test_every_flag_combination_trains_a_step_and_infers(flags):
    settings = dict(zip(FLAGS, flags))
    # One encoder and two decoder layers: QRL still acts (before the second), at half the cost.
    sizes = ("encoder_layers=1", "decoder_layers=2")
    model = build(*sizes, *(f"rank.{name}={value}" for name, value in settings.items()))
    model.criterion.matcher.set_training_progress(1.0)  # HMC, when on, is in use
    assert model.criterion.matcher.use_high_order == settings["hmc"]
    assert model.criterion.classification_loss == ("gcl" if settings["gcl"] else "focal")
    assert (model.decoder.rank_class_bias is not None) == settings["rch"]
    assert (model.decoder.rank_content_query is not None) == settings["qrl"]
    model.train()
    losses = model(batch())
    assert {"loss_class_dn", "loss_bbox_dn_0", "loss_giou_enc", "loss_class_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox_dn"].item() > 0  # the batch has targets: denoising ran
    sum(losses.values()).backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert len(trained) > 100
    model.eval()
    with torch.no_grad():
        results = model(batch())
    assert [len(r["instances"]) for r in results] == [20, 20]


def run_decoder(model: DINO, with_denoising: bool):
    """The model's raw outputs on the batch in float64, with or without denoising queries."""
    inputs = batch()
    images, padding_mask = model.preprocess_images(inputs)
    targets = model.prepare_targets(inputs, images)
    denoising = model.denoising(targets, model.label_embedding, model.num_queries)
    assert denoising is not None
    with torch.no_grad():
        outputs = model.predict(images.tensor, padding_mask, denoising if with_denoising else None)
    return outputs, denoising.num_queries


@pytest.mark.parametrize("rank", ["rank.rch=False rank.qrl=False", "rank.rch=True rank.qrl=True"])
def test_matching_queries_never_see_the_denoising_queries(rank):
    model = build(*rank.split()).double().eval()
    model.denoising.generator = torch.Generator().manual_seed(0)
    with_dn, p = run_decoder(model, True)
    without, _ = run_decoder(model, False)
    assert p > 0 and without["num_denoising"] == 0
    for key in ("logits", "boxes"):
        for ours, alone in zip(with_dn[key], without[key]):
            torch.testing.assert_close(ours[:, p:], alone, rtol=1e-10, atol=1e-12)


def test_sorting_leaves_the_denoising_queries_in_their_slots(monkeypatch):
    """RCH sorts the matching queries between layers; the denoising outputs are those of the same
    weights with sorting switched off (self-attention does not depend on the order of the other
    queries), so no denoising query moved. The matching outputs do differ in order."""
    model = build("rank.rch=True", "rank.qrl=False").double().eval()
    for table in model.decoder.rank_class_bias:
        torch.nn.init.normal_(table.weight, std=3.0)
    model.denoising.generator = torch.Generator().manual_seed(1)
    sorted_outputs, p = run_decoder(model, True)
    monkeypatch.setattr(DINODecoder, "sorts_queries", property(lambda self: False))
    model.denoising.generator = torch.Generator().manual_seed(1)
    unsorted_outputs, _ = run_decoder(model, True)
    for layer, (ours, plain) in enumerate(zip(sorted_outputs["boxes"], unsorted_outputs["boxes"])):
        torch.testing.assert_close(ours[:, :p], plain[:, :p], rtol=1e-10, atol=1e-12)
        if layer > 0:
            assert not torch.allclose(ours[:, p:], plain[:, p:])
    assert not torch.equal(sorted_outputs["order"][-1], unsorted_outputs["order"][-1])


def test_rch_biases_touch_the_matching_queries_only():
    model = build("rank.rch=True", "rank.qrl=False").double().eval()
    model.denoising.generator = torch.Generator().manual_seed(2)
    before, p = run_decoder(model, True)
    for table in model.decoder.rank_class_bias:
        torch.nn.init.constant_(table.weight, 5.0)
    model.denoising.generator = torch.Generator().manual_seed(2)
    after, _ = run_decoder(model, True)
    for layer, (old, new) in enumerate(zip(before["logits"], after["logits"])):
        torch.testing.assert_close(new[:, :p], old[:, :p], rtol=1e-10, atol=1e-12)
        if layer == 0:  # same queries in the same order: exactly the bias apart
            torch.testing.assert_close(new[:, p:], old[:, p:] + 5.0, rtol=1e-10, atol=1e-10)


def test_rank_dino_trains_and_infers_under_bf16_autocast():
    """train.amp on the DINO base: the denoising queries, the masked self-attention and the
    losses run under CPU bf16 autocast; losses stay finite and near float32's."""
    model = build("encoder_layers=1", "decoder_layers=2")
    model.train()
    generator_seed = 3
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model.denoising.generator = torch.Generator().manual_seed(generator_seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            result = model(batch())
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in result.values())
        losses[name] = sum(result.values()).item()
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        results = model(batch())
    assert all(torch.isfinite(r["instances"].scores).all() for r in results)
