"""Two-stage proposals: the grid boxes, validity, top-k selection, tiny inputs."""

import math

import torch

from rankdetr.modeling.two_stage import TwoStageProposals, grid_proposals


def test_grid_proposals_are_pixel_centred_boxes_of_the_unpadded_image():
    shapes = torch.tensor([[4, 6], [2, 3]])
    mask = torch.zeros(2, 30, dtype=torch.bool)
    # Image 1 covers 2 of 4 rows and 3 of 6 columns of level 0 (1 x 2 of level 1).
    level0 = mask[1, :24].view(4, 6)
    level0[2:, :] = True
    level0[:, 3:] = True
    level1 = mask[1, 24:].view(2, 3)
    level1[1:, :] = True
    level1[:, 2:] = True
    logits, valid = grid_proposals(mask, shapes)
    for n, extents in enumerate([[(4, 6), (2, 3)], [(2, 3), (1, 2)]]):
        start = 0
        for level, (h, w) in enumerate(shapes.tolist()):
            vh, vw = extents[level]
            for i in range(h):
                for j in range(w):
                    box = [(j + 0.5) / vw, (i + 0.5) / vh, 0.05 * 2**level, 0.05 * 2**level]
                    ok = not mask[n, start].item() and all(0.01 < v < 0.99 for v in box)
                    assert valid[n, start].item() == ok
                    if ok:
                        expected = torch.tensor([math.log(v / (1 - v)) for v in box])
                        torch.testing.assert_close(logits[n, start], expected)
                    else:
                        assert torch.isinf(logits[n, start]).all()
                    start += 1


def test_selection_takes_the_best_valid_proposals_and_handles_tiny_inputs():
    torch.manual_seed(0)
    module = TwoStageProposals(num_classes=3, embed_dim=16)
    memory = torch.randn(1, 7, 16)
    mask = torch.zeros(1, 7, dtype=torch.bool)
    shapes = torch.tensor([[2, 2], [1, 3]])
    out = module(memory, mask, shapes, num_queries=3)
    scores = out["enc_logits"][0, :, 0]
    _, valid = grid_proposals(mask, shapes)
    best = scores.masked_fill(~valid[0], float("-inf")).topk(3).indices
    torch.testing.assert_close(out["reference_boxes"][0], out["enc_boxes"][0, best])
    assert out["query_pos"].shape == (1, 3, 16)
    assert not out["reference_boxes"].requires_grad
    # More queries than positions: the ranking of all 7 repeats cyclically (0..6, 0..6, 0..5).
    many = module(memory, mask, shapes, num_queries=20)
    ranking = scores.argsort(descending=True)
    cyclic = ranking[torch.arange(20) % 7]
    torch.testing.assert_close(many["reference_boxes"][0], out["enc_boxes"][0, cyclic])
    torch.testing.assert_close(many["query_pos"][0, 7:14], many["query_pos"][0, :7])
    assert torch.isfinite(many["query_pos"]).all()
