"""Initialisation as the original release does it, module by module, on the R50 model config.

The release applies xavier_uniform_ to every matrix inside its transformer (encoder, decoder
layers, the QRL parts, the two-stage projections), then each deformable attention's own
initialisation; heads, RCH biases and content queries sit outside it and keep theirs. Each
check below uses the bounds of the distributions, so that another initialisation (PyTorch's
default kaiming-uniform, normal(0, 1), zeros) fails it.
"""

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

R50 = Path(__file__).resolve().parents[2] / "configs" / "models" / "rank_detr_r50.py"


@pytest.fixture(scope="module")
def model():
    cfg = LazyConfig.load(str(R50))
    cfg.model.num_classes = 80
    torch.manual_seed(0)
    return instantiate(cfg.model)


def xavier_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def default_linear_bound(weight: torch.Tensor) -> float:
    """PyTorch's nn.Linear default (kaiming_uniform_ with a = sqrt(5)): 1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(weight.shape[1])


def assert_uniform_within(tensor: torch.Tensor, bound: float, name: str) -> None:
    """All values inside [-bound, bound], and the largest near the bound (thousands of samples of
    a uniform law reach 0.9 of it with probability 1 - 0.9^N)."""
    largest = tensor.abs().max().item()
    assert largest <= bound * (1 + 1e-6), f"{name}: {largest} above {bound}"
    assert largest >= 0.9 * bound, f"{name}: {largest} far below {bound}"


def transformer_matrices(model):
    """(name, tensor) of the matrices the release's transformer-wide xavier pass covers, except
    the deformable attentions' offset and weight projections (zeroed afterwards)."""
    prefixes = (
        "encoder.layers.",
        "decoder.layers.",
        "decoder.rank_content_query.",
        "decoder.rank_query_proj.",
        "decoder.rank_query_fuse.",
        "proposals.memory_proj.",
        "proposals.pos_proj.",
    )
    for name, p in model.named_parameters():
        zeroed = ("sampling_offsets." in name) or ("attention_weights." in name)
        if name.startswith(prefixes) and p.dim() > 1 and not zeroed:
            yield name, p.detach()


def test_transformer_matrices_are_xavier_uniform(model):
    names = set()
    for name, weight in transformer_matrices(model):
        assert_uniform_within(weight, xavier_bound(weight), name)
        names.add(name.split(".")[-2] if "layers." in name else name.split(".")[1])
    # QRL's rank embeddings C^l are random (paper: "randomly initialized"), not zero.
    assert {"rank_content_query", "rank_query_proj", "rank_query_fuse"} <= names
    assert {"linear1", "linear2", "value_proj", "output_proj", "memory_proj", "pos_proj"} <= names


def test_deformable_attention_keeps_its_own_initialisation(model):
    attentions = [m for n, m in model.named_modules() if n.endswith(("self_attn", "cross_attn"))]
    deformable = [m for m in attentions if hasattr(m, "sampling_offsets")]
    assert len(deformable) == 12  # 6 encoder + 6 decoder layers
    for attention in deformable:
        assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
        assert torch.count_nonzero(attention.attention_weights.weight) == 0
        assert torch.count_nonzero(attention.attention_weights.bias) == 0
        assert torch.count_nonzero(attention.value_proj.bias) == 0
        # Head 0 looks along +x: its points at distances 1..P on every level.
        offsets = attention.sampling_offsets.bias.view(8, 4, 4, 2)
        assert offsets[0, :, :, 0].tolist() == [[1.0, 2.0, 3.0, 4.0]] * 4
        assert torch.count_nonzero(offsets[0, :, :, 1]) == 0


def test_multihead_attention_biases_zero_and_other_biases_default(model):
    for layer in model.decoder.layers:
        attention = layer.self_attn.attn
        assert torch.count_nonzero(attention.in_proj_bias) == 0
        assert torch.count_nonzero(attention.out_proj.bias) == 0
        # FFN biases keep nn.Linear's default uniform(+-1/sqrt(fan_in)).
        assert_uniform_within(
            layer.ffn.linear1.bias, default_linear_bound(layer.ffn.linear1.weight), "ffn bias"
        )


def test_heads_rch_and_queries_keep_the_release_initialisation(model):
    prior = -math.log(99.0)  # scores start at 0.01
    heads = list(model.decoder.class_heads) + [model.proposals.class_head]
    for head in heads:
        # nn.Linear default, not xavier (xavier's bound, sqrt(6 / 336), is 2.4x larger).
        assert_uniform_within(head.weight, default_linear_bound(head.weight), "class head")
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for box_head in list(model.decoder.box_heads) + [model.proposals.box_head]:
        assert torch.count_nonzero(box_head.layers[-1].weight) == 0
        assert torch.count_nonzero(box_head.layers[-1].bias) == 0
        weight = box_head.layers[0].weight
        assert_uniform_within(weight, default_linear_bound(weight), "box head")
    for table in model.decoder.rank_class_bias:
        assert torch.count_nonzero(table.weight) == 0
    for normal in (model.level_embeds, model.query_embedding.weight):  # normal(0, 1)
        assert 0.9 < normal.std().item() < 1.1 and normal.abs().max() > 2.5
