"""RankDecoder: sorting within groups, QRL permutations and fusion, RCH per-rank bias, gradients."""

import itertools

import pytest
import torch

from rankdetr.modeling.decoder import RankDecoder, sort_within_groups

C, K, HEADS, LEVELS, POINTS = 16, 5, 2, 2, 2
SHAPES = torch.tensor([[4, 6], [2, 3]])
STARTS = torch.tensor([0, 24])


def make_decoder(rch=True, qrl=True, layers=3, max_queries=7):
    torch.manual_seed(0)
    decoder = RankDecoder(
        num_classes=K,
        max_queries=max_queries,
        num_layers=layers,
        embed_dim=C,
        num_heads=HEADS,
        num_levels=LEVELS,
        num_points=POINTS,
        ffn_dim=32,
        rank_adaptive_head=rch,
        query_rank_layer=qrl,
    )
    with torch.no_grad():  # non-zero rank parameters and heads, so that each one matters
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return decoder


def make_inputs(queries=7, batch=2):
    g = torch.Generator().manual_seed(1)
    return {
        "query": torch.randn(batch, queries, C, generator=g),
        "query_pos": torch.randn(batch, queries, C, generator=g),
        "reference_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25,
        "memory": torch.randn(batch, 30, C, generator=g),
        "spatial_shapes": SHAPES,
        "level_start_index": STARTS,
        "valid_ratios": torch.ones(batch, LEVELS, 2),
        "memory_padding_mask": None,
    }


def test_sort_within_groups_matches_a_per_group_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 9, generator=g)
    groups = [2, 3, 4]
    order = sort_within_groups(scores, groups)
    for n in range(3):
        start = 0
        for size in groups:
            expected = sorted(range(start, start + size), key=lambda i: -scores[n, i].item())
            assert order[n, start : start + size].tolist() == expected
            start += size


def capture_layer_inputs(decoder):
    captured = []
    for layer in decoder.layers:
        layer.register_forward_pre_hook(lambda m, args: captured.append(list(args)))
    return captured


def capture_layer_outputs(decoder):
    outputs = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, args, out: outputs.append(out))
    return outputs


@pytest.mark.parametrize("rch,qrl", [(True, True), (True, False), (False, True)])
def test_queries_positions_and_boxes_move_together(rch, qrl):
    decoder = make_decoder(rch=rch, qrl=qrl)
    if qrl:  # make the fusion the identity on the content part, to observe the permutation
        with torch.no_grad():
            for fuse in decoder.rank_query_fuse:
                fuse.weight.zero_()
                fuse.weight[:, :C].copy_(torch.eye(C))
                fuse.bias.zero_()
    captured = capture_layer_inputs(decoder)
    layer_outputs = capture_layer_outputs(decoder)
    groups = [3, 4]
    out = decoder(**make_inputs(), group_sizes=groups)
    for layer_index in range(1, 3):
        # Eq. 2 / the release: the key is the class head alone, without the RCH bias.
        class_logits = decoder.class_heads[layer_index - 1](layer_outputs[layer_index - 1])
        ranking = sort_within_groups(class_logits.amax(-1), groups)
        query_in, pos_in, boxes_in = captured[layer_index][:3]
        prev_pos = captured[layer_index - 1][1]
        for n in range(2):
            idx = ranking[n]
            torch.testing.assert_close(query_in[n], layer_outputs[layer_index - 1][n, idx])
            torch.testing.assert_close(pos_in[n], prev_pos[n, idx])
            expected_boxes = out["boxes"][layer_index - 1][
                n, idx
            ]  # look-forward-twice: same values
            torch.testing.assert_close(boxes_in[n, :, 0], expected_boxes)
            torch.testing.assert_close(
                out["order"][layer_index][n], out["order"][layer_index - 1][n, idx]
            )
        # Groups never mix.
        assert (ranking[:, :3] < 3).all() and (ranking[:, 3:] >= 3).all()


@pytest.mark.parametrize("qrl", [True, False])
def test_the_rch_bias_does_not_enter_the_ranking_key(qrl):
    """A large RCH bias on the last slot of each group would move that query to the top if the
    key included it; with the class head alone the order is the class head's."""
    decoder = make_decoder(rch=True, qrl=qrl)
    with torch.no_grad():
        for table in decoder.rank_class_bias:
            table.weight.zero_()
            table.weight[[2, 6]] = 50.0
    layer_outputs = capture_layer_outputs(decoder)
    groups = [3, 4]
    out = decoder(**make_inputs(), group_sizes=groups)
    for layer_index in range(1, 3):
        class_logits = decoder.class_heads[layer_index - 1](layer_outputs[layer_index - 1])
        expected = sort_within_groups(class_logits.amax(-1), groups)
        previous_order = out["order"][layer_index - 1]
        assert out["order"][layer_index].tolist() == previous_order.gather(1, expected).tolist()
        # The returned logits carry the bias (Eq. 1), and a key with it would sort differently.
        bias = decoder.rank_class_bias[layer_index - 1].weight[None]
        torch.testing.assert_close(out["logits"][layer_index - 1], class_logits + bias)
        biased_key_order = sort_within_groups(out["logits"][layer_index - 1].amax(-1), groups)
        assert biased_key_order[:, [0, 3]].tolist() == [[2, 6], [2, 6]]
        assert biased_key_order.tolist() != expected.tolist()


def test_no_sorting_without_rank_parameters():
    decoder = make_decoder(rch=False, qrl=False)
    out = decoder(**make_inputs(), group_sizes=[3, 4])
    for order in out["order"]:
        assert order.tolist() == [list(range(7))] * 2
    assert decoder.rank_class_bias is None and decoder.rank_content_query is None


def test_rch_adds_the_bias_of_each_rank():
    decoder = make_decoder(rch=True, qrl=False)
    layer_outputs = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, args, out: layer_outputs.append(out))
    groups = [3, 4]
    out = decoder(**make_inputs(), group_sizes=groups)
    for layer_index in range(3):
        plain = decoder.class_heads[layer_index](layer_outputs[layer_index])
        bias = decoder.rank_class_bias[layer_index].weight
        # Slot i of group [3, 4] uses row i: ranks 0..2 -> rows 0..2, ranks 0..3 -> rows 3..6.
        torch.testing.assert_close(out["logits"][layer_index], plain + bias[None, :7])
    # At inference only the first group runs, and it reuses the same rows 0..2.
    inputs = make_inputs(queries=3)
    layer_outputs.clear()
    out = decoder(**inputs, group_sizes=[3])
    plain = decoder.class_heads[0](layer_outputs[0])
    torch.testing.assert_close(
        out["logits"][0], plain + decoder.rank_class_bias[0].weight[None, :3]
    )


def test_qrl_fuses_the_rank_embedding_of_each_slot():
    decoder = make_decoder(rch=False, qrl=True)
    captured = capture_layer_inputs(decoder)
    layer_outputs = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, args, out: layer_outputs.append(out))
    out = decoder(**make_inputs(), group_sizes=[7])
    ranking = sort_within_groups(out["logits"][0].amax(-1), [7])
    sorted_query = torch.stack([layer_outputs[0][n, ranking[n]] for n in range(2)])
    rank = decoder.rank_query_proj[0](decoder.rank_content_query[0].weight)
    expected = decoder.rank_query_fuse[0](
        torch.cat([sorted_query, rank[None].expand(2, -1, -1)], -1)
    )
    torch.testing.assert_close(captured[1][0], expected)


def test_gradients_reach_every_parameter():
    decoder = make_decoder(rch=True, qrl=True)
    out = decoder(**make_inputs(), group_sizes=[3, 4])
    loss = sum(logit.sigmoid().sum() for logit in out["logits"]) + sum(
        b.sum() for b in out["boxes"]
    )
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rch_biases_start_at_zero_and_qrl_embeddings_random():
    """RCH s^l starts at zero (the release); QRL's C^l is random (xavier, as the release's
    transformer-wide init leaves it). The full init scheme is in test_init.py."""
    torch.manual_seed(0)
    decoder = RankDecoder(num_classes=K, max_queries=7, num_layers=2, embed_dim=C, num_heads=HEADS,
                          num_levels=LEVELS, num_points=POINTS, ffn_dim=32)  # fmt: skip
    for table in decoder.rank_class_bias:
        assert torch.count_nonzero(table.weight) == 0
    for table in decoder.rank_content_query:
        assert torch.count_nonzero(table.weight) == table.weight.numel()
        assert table.weight.abs().max() <= (6 / (7 + C)) ** 0.5


def test_group_sizes_must_cover_the_queries():
    decoder = make_decoder()
    with pytest.raises(ValueError, match="do not sum"):
        decoder(**make_inputs(), group_sizes=[3, 3])


@pytest.mark.parametrize("rch,qrl", list(itertools.product([False, True], repeat=2)))
def test_parameter_count_grows_only_with_the_rank_parts(rch, qrl):
    base = sum(p.numel() for p in make_decoder(False, False).parameters())
    count = sum(p.numel() for p in make_decoder(rch, qrl).parameters())
    layers, queries = 3, 7
    extra = rch * layers * queries * K + qrl * (layers - 1) * (
        queries * C + C * C + C + 2 * C * C + C
    )
    assert count - base == extra
