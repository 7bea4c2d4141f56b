"""Every option a config sets reaches the code it controls and changes its result.

Each test builds the model from the demo config (a real LazyConfig tree) with one option changed,
then checks the part that option controls against an independent computation: the matcher's
cost against Eq. 5 / Eq. 8 in plain Python, the classification loss against Eq. 6 / Eq. 7, the
criterion's target repetition k, the loss weights, and the decoder's query groups and
look-forward-twice gradient. A hard-coded value in the wiring (a power of 4, a "giou" target,
a default k) makes one of them fail.
"""

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from rankdetr.modeling.matcher import HungarianMatcher
from tests import reference_math as ref
from tests.modeling.test_matcher import high_order_cost, standard_cost

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py"
NUM_CLASSES = 5


def build(*overrides: str, seed: int = 0):
    """The demo config's model with `model.`-relative overrides, e.g. "rank.hmc_power=2.0"."""
    cfg = LazyConfig.load(str(DEMO))
    cfg.model.num_classes = NUM_CLASSES
    cfg = LazyConfig.apply_overrides(cfg, [f"model.{o}" for o in overrides])
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def batch():
    inputs = []
    for (h, w), boxes, classes in [
        ((96, 128), [[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], [0, 3]),
        ((96, 128), [[20.0, 30.0, 50.0, 80.0]], [2]),
    ]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_generator())
        inputs.append({"image": image, "instances": instances})
    return inputs


def _generator():
    return torch.Generator().manual_seed(7)


def random_predictions(queries=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(queries, NUM_CLASSES, generator=g, dtype=torch.float64)
    centres = torch.rand(queries, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    sizes = torch.rand(queries, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
    boxes = torch.cat([centres, sizes], -1)
    labels = torch.tensor([1, 4, 1])
    gt = boxes[:3].clone() + torch.tensor([0.02, -0.03, 0.01, 0.02], dtype=torch.float64)
    return logits, boxes, labels, gt


# ---------------------------------------------------------------------------------------------
# HMC: rank.hmc, hmc_start, hmc_power, hmc_quality -> the model's matcher


@pytest.mark.parametrize("power,quality", [(2.0, "iou"), (6.0, "giou")])
def test_hmc_options_reach_the_matcher(power, quality):
    model = build(f"rank.hmc_power={power}", f"rank.hmc_quality={quality}", "rank.hmc_start=0.5")
    matcher = model.criterion.matcher
    logits, boxes, labels, gt = random_predictions()

    def cost_now():
        return matcher.cost_matrix(logits, boxes, labels, gt)

    model.set_training_progress(0.49)
    expected = [[standard_cost(logits[q].tolist(), boxes[q].tolist(), int(labels[t]),
                               gt[t].tolist()) for t in range(3)] for q in range(6)]  # fmt: skip
    torch.testing.assert_close(cost_now(), torch.tensor(expected, dtype=torch.float64))
    model.set_training_progress(0.5)
    expected = [[high_order_cost(logits[q].tolist(), boxes[q].tolist(), int(labels[t]),
                                 gt[t].tolist(), power=power, quality=quality)
                 for t in range(3)] for q in range(6)]  # fmt: skip
    torch.testing.assert_close(cost_now(), torch.tensor(expected, dtype=torch.float64))


def test_hmc_off_never_switches():
    model = build("rank.hmc=False", "rank.hmc_start=0.0")
    model.set_training_progress(1.0)
    assert not model.criterion.matcher.use_high_order


# ---------------------------------------------------------------------------------------------
# GCL / varifocal: rank.gcl, gcl_target, gcl_power, varifocal -> the model's criterion


def expected_class_loss(logits, boxes, targets, matches, kind, target, power):
    """Sum over (query, class) of Eq. 6 (gcl), Eq. 7 (varifocal) or the focal loss, in plain
    Python, / number of boxes * class weight 2."""
    alpha, gamma, eps = 0.25, 2.0, ref.RELEASE_IOU_EPS
    positives = {}
    for n, (rows, cols) in enumerate(matches):
        for q, t in zip(rows.tolist(), cols.tolist()):
            positives[(n, q)] = (int(targets[n]["labels"][t]), targets[n]["boxes"][t].tolist())
    total = 0.0
    for n in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            for k in range(logits.shape[2]):
                p = ref.sigmoid(logits[n, q, k].item())
                if (n, q) in positives and positives[(n, q)][0] == k:
                    a, b = ref.xyxy(boxes[n, q].tolist()), ref.xyxy(positives[(n, q)][1])
                    quality = (
                        ref.iou(a, b, eps) if target == "iou" else (ref.giou(a, b, eps) + 1) / 2
                    )
                    t = quality**power
                    if kind == "gcl":
                        total += alpha * abs(t - p) ** gamma * ref.bce(p, t)
                    elif kind == "varifocal":
                        total += t * ref.bce(p, t)
                    else:
                        total += alpha * (1 - p) ** gamma * ref.bce(p, 1.0)
                elif kind == "varifocal":
                    total += 0.75 * p**gamma * ref.bce(p, 0.0)
                else:
                    total += (1 - alpha) * p**gamma * ref.bce(p, 0.0)
    return 2.0 * total / sum(len(t["labels"]) for t in targets)


@pytest.mark.parametrize(
    "overrides,kind,target,power",
    [
        ((), "gcl", "giou", 1.0),
        (("rank.gcl_target=iou", "rank.gcl_power=2.0"), "gcl", "iou", 2.0),
        (("rank.gcl_target=giou", "rank.gcl_power=0.5"), "gcl", "giou", 0.5),
        (("rank.gcl=False", "rank.varifocal=True", "rank.gcl_target=iou"), "varifocal", "iou", 1),
        (("rank.gcl=False",), "focal", "giou", 1.0),
    ],
)
def test_classification_loss_options_reach_the_criterion(overrides, kind, target, power):
    model = build(*overrides)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, NUM_CLASSES, generator=g, dtype=torch.float64)
    centres = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
    sizes = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
    boxes = torch.cat([centres, sizes], -1)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": boxes[0, :2] + 0.02},
        {"labels": torch.tensor([4]), "boxes": boxes[1, 3:4] - 0.01},
    ]
    losses = model.criterion({"logits": [logits], "boxes": [boxes]}, targets)
    matches = model.criterion.matcher(logits, boxes, targets)
    expected = expected_class_loss(logits, boxes, targets, matches, kind, target, power)
    assert losses["loss_class"].item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Hybrid matching: one2many_repeats, weight_one2many, loss_weights


def test_one2many_repeats_reach_the_criterion(monkeypatch):
    """The demo says k = 3; with k = 2 the one-to-many outputs are matched to 2 copies of the
    targets (and to 1 copy for the one-to-one outputs)."""
    model = build("one2many_repeats=2")
    calls = []
    original = HungarianMatcher.match_layers

    def spy(self, logits, boxes, targets):  # (L, N, Q, K): the layers of one group at once
        calls.append((logits.shape[2], [len(t["labels"]) for t in targets]))
        return original(self, logits, boxes, targets)

    monkeypatch.setattr(HungarianMatcher, "match_layers", spy)
    model.train()
    model(batch())
    by_queries = {}
    for queries, counts in calls:
        by_queries.setdefault(queries, set()).add(tuple(counts))
    assert by_queries[model.num_queries_one2many] == {(4, 2)}  # 2 x (2, 1) targets
    assert by_queries[model.num_queries] == {(2, 1)}


def test_loss_weights_and_lambda_reach_criterion_and_matcher():
    default = build("rank.hmc_start=0.0")  # HMC from the start: matching ignores the weights
    model = build(
        "loss_weights={class:1.0,bbox:3.0,giou:4.0}", "weight_one2many=0.5", "rank.hmc_start=0.0"
    )
    model.load_state_dict(default.state_dict())
    matcher = model.criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1.0, 3.0, 4.0)
    for m in (default, model):
        m.train()
        m.set_training_progress(0.0)
    torch.manual_seed(1)
    reference = {k: v.item() for k, v in default(batch()).items()}
    torch.manual_seed(1)
    losses = {k: v.item() for k, v in model(batch()).items()}
    ratios = {"class": 1.0 / 2.0, "bbox": 3.0 / 5.0, "giou": 4.0 / 2.0}
    for name, value in losses.items():
        term = name.removeprefix("o2m_").split("_")[1]
        expected = reference[name] * ratios[term] * (0.5 if name.startswith("o2m_") else 1.0)
        assert value == pytest.approx(expected, rel=1e-5), name


# ---------------------------------------------------------------------------------------------
# Query groups and look-forward-twice through RankDETR


def decoder_outputs(model, num_one2many):
    images, mask = model.preprocess_images(batch())
    return model.predict(images.tensor, mask, num_one2many)


def test_one_to_one_outputs_ignore_the_one_to_many_queries():
    """In training the one-to-one queries come first and never see the one-to-many ones: their
    outputs equal inference's (which runs them alone) and do not move when the one-to-many
    content queries change."""
    model = build().eval()  # eval: no dropout; predict still takes one-to-many queries
    n, m = model.num_queries, model.num_queries_one2many
    with torch.no_grad():
        alone = decoder_outputs(model, 0)
        together = decoder_outputs(model, m)
        model.query_embedding.weight[n:] += torch.randn_like(model.query_embedding.weight[n:])
        perturbed = decoder_outputs(model, m)
    for layer in range(len(alone["logits"])):
        for key in ("logits", "boxes"):
            torch.testing.assert_close(together[key][layer][:, :n], alone[key][layer])
            torch.testing.assert_close(perturbed[key][layer][:, :n], alone[key][layer])
        assert not torch.allclose(
            perturbed["logits"][layer][:, n:], together["logits"][layer][:, n:]
        )
        # Sorted separately: every slot holds a query of its own group.
        order = together["order"][layer]
        assert (order[:, :n] < n).all() and (order[:, n:] >= n).all()


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_sends_the_next_box_loss_into_the_previous_box_head(
    look_forward_twice,
):
    """Layer 1's predicted boxes refine layer 0's undetached refinement (look-forward-twice), so
    a loss on them reaches layer 0's box head; without it, only layer 1's head is reached."""
    model = build(f"look_forward_twice={look_forward_twice}").eval()
    outputs = decoder_outputs(model, 0)
    outputs["boxes"][1].sum().backward()
    previous_head = model.decoder.box_heads[0]
    gradient = sum(
        p.grad.abs().sum().item() for p in previous_head.parameters() if p.grad is not None
    )
    assert (gradient > 0) == look_forward_twice
    assert model.decoder.box_heads[1].layers[-1].weight.grad.abs().sum() > 0


def test_rch_bias_and_qrl_reach_the_decoder():
    """RCH adds s^l to the class head's logits of each rank slot (Eq. 1); QRL fuses the sorted
    content queries with Linear(C^l) (Eq. 2). Each is absent when its flag is off."""
    for rch, qrl in [(True, False), (False, True), (False, False)]:
        model = build(f"rank.rch={rch}", f"rank.qrl={qrl}").eval()
        assert (model.decoder.rank_class_bias is not None) == rch
        assert (model.decoder.rank_content_query is not None) == qrl
        assert model.decoder.sorts_queries == (rch or qrl)
    model = build().eval()
    layer_outputs, layer_inputs = [], []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: layer_outputs.append(out))
        layer.register_forward_pre_hook(lambda mod, args: layer_inputs.append(args[0]))
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.rank_class_bias[1].weight)
        outputs = decoder_outputs(model, 0)
    n = model.num_queries
    class_logits = model.decoder.class_heads[1](layer_outputs[1])
    torch.testing.assert_close(
        outputs["logits"][1], class_logits + model.decoder.rank_class_bias[1].weight[:n][None]
    )
    ranking = class_logits_ranking = model.decoder.class_heads[0](layer_outputs[0]).amax(-1)
    order = class_logits_ranking.argsort(dim=1, descending=True, stable=True)
    sorted_content = layer_outputs[0].gather(1, order[..., None].expand_as(layer_outputs[0]))
    rank_term = model.decoder.rank_query_proj[0](model.decoder.rank_content_query[0].weight[:n])
    fused = model.decoder.rank_query_fuse[0](
        torch.cat([sorted_content, rank_term[None].expand_as(sorted_content)], -1)
    )
    torch.testing.assert_close(layer_inputs[1], fused)
    assert ranking.shape == (2, n) and not math.isnan(ranking.sum().item())


def test_structural_arguments_reach_the_modules():
    """Sizes a config sets (here changed from the demo's) end up in the built modules."""
    model = build(
        "embed_dim=64", "num_heads=2", "num_points=3", "ffn_dim=96", "dropout=0.25",
        "encoder_layers=1", "decoder_layers=2", "num_queries=7", "num_queries_one2many=11",
        "num_detections=9", "neck.out_channels=64", "neck.norm_groups=8",
    )  # fmt: skip
    assert len(model.encoder.layers) == 1 and len(model.decoder.layers) == 2
    layer = model.decoder.layers[0]
    assert layer.self_attn.attn.num_heads == 2 and layer.self_attn.attn.embed_dim == 64
    assert layer.cross_attn.num_points == 3 and layer.cross_attn.num_heads == 2
    assert (
        layer.ffn.linear1.out_features == 96
        and model.encoder.layers[0].ffn.linear1.out_features == 96
    )
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.25 for p in dropouts)
    assert layer.self_attn.attn.dropout == 0.25
    assert model.query_embedding.weight.shape == (7 + 11, 64)
    assert model.decoder.rank_class_bias[0].weight.shape == (18, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        results = model(batch())
    assert [len(r["instances"]) for r in results] == [9, 9]


def counting(forward, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(forward)
        return forward(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(dropout):
    """model.activation_checkpointing recomputes each encoder / decoder layer in backward; with
    the RNG state restored (dropout on too), losses and every gradient are bit for bit those of
    a plain run on the same weights."""
    results = []
    for checkpointing in (False, True):
        model = build(f"activation_checkpointing={checkpointing}", f"dropout={dropout}")
        assert model.encoder.activation_checkpointing == model.decoder.activation_checkpointing
        assert model.decoder.activation_checkpointing == checkpointing
        model.train()
        calls = []
        for layer in (model.encoder.layers[0], model.decoder.layers[0]):
            layer.forward = counting(layer.forward, calls)
        torch.manual_seed(3)
        losses = model(batch())
        sum(losses.values()).backward()
        # Checkpointed layers run again in backward.
        assert len(calls) == (4 if checkpointing else 2)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (plain_losses, plain_grads), (ckpt_losses, ckpt_grads) = results
    for name, value in plain_losses.items():
        assert torch.equal(ckpt_losses[name], value), name
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 100
    for name, grad in plain_grads.items():
        assert torch.equal(ckpt_grads[name], grad), name
