"""Box conversions and IoU against plain-Python float64 formulas."""

from functools import partial

import pytest
import torch

from rankdetr.layers import box_ops
from tests import reference_math as ref


def random_boxes(n, generator):
    centres = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    sizes = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.5
    return torch.cat([centres, sizes], dim=1)


def test_conversions_round_trip_and_match_the_definition():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(20, g)
    xyxy = box_ops.box_cxcywh_to_xyxy(boxes)
    for b, converted in zip(boxes.tolist(), xyxy.tolist()):
        assert converted == torch.tensor(ref.xyxy(b), dtype=torch.float64).tolist()
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), boxes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conversions_are_torchvisions_arithmetic_bit_for_bit(dtype):
    """Our conversions (one cat) compute what torchvision's box_convert (the release's) does,
    in values and in gradients, to the last bit."""
    from torchvision.ops import box_convert

    g = torch.Generator().manual_seed(2)
    boxes = random_boxes(50, g).reshape(5, 10, 4).to(dtype)
    weights = torch.randn(5, 10, 4, generator=g).to(dtype)
    pairs = [(box_ops.box_cxcywh_to_xyxy, "cxcywh", "xyxy"),
             (box_ops.box_xyxy_to_cxcywh, "xyxy", "cxcywh")]  # fmt: skip
    for ours, in_fmt, out_fmt in pairs:
        results = []
        theirs = partial(box_convert, in_fmt=in_fmt, out_fmt=out_fmt)
        for convert in (ours, theirs):
            leaf = boxes.clone().requires_grad_(True)
            out = convert(leaf)
            (out * weights).sum().backward()
            results.append((out.detach(), leaf.grad))
        assert torch.equal(results[0][0], results[1][0]), in_fmt
        assert torch.equal(results[0][1], results[1][1]), in_fmt


def test_pairwise_functions_broadcast_leading_dimensions():
    """(L, N, 4) against (M, 4): each of the L slices equals its own 2-D call bit for bit."""
    g = torch.Generator().manual_seed(3)
    a = box_ops.box_cxcywh_to_xyxy(random_boxes(18, g)).reshape(3, 6, 4).float()
    b = box_ops.box_cxcywh_to_xyxy(random_boxes(5, g)).float()
    for pairwise in (box_ops.pairwise_box_iou, box_ops.pairwise_generalized_box_iou):
        stacked = pairwise(a, b, 1e-6)
        assert stacked.shape == (3, 6, 5)
        for layer in range(3):
            assert torch.equal(stacked[layer], pairwise(a[layer], b, 1e-6))


def test_pairwise_and_elementwise_iou_and_giou():
    g = torch.Generator().manual_seed(1)
    a = box_ops.box_cxcywh_to_xyxy(random_boxes(7, g))
    b = box_ops.box_cxcywh_to_xyxy(random_boxes(5, g))
    b[0] = a[0]  # identical pair: IoU = GIoU = 1
    b[1] = torch.tensor([2.0, 2.0, 3.0, 3.0], dtype=torch.float64)  # far away: IoU 0, GIoU < 0
    iou = box_ops.pairwise_box_iou(a, b)
    giou = box_ops.pairwise_generalized_box_iou(a, b)
    for i, box_a in enumerate(a.tolist()):
        for j, box_b in enumerate(b.tolist()):
            assert abs(iou[i, j].item() - ref.iou(box_a, box_b)) < 1e-6
            assert abs(giou[i, j].item() - ref.giou(box_a, box_b)) < 1e-6
    assert abs(iou[0, 0].item() - 1) < 1e-6 and abs(giou[0, 0].item() - 1) < 1e-6
    assert (iou[:, 1] == 0).all() and (giou[:, 1] < 0).all()
    torch.testing.assert_close(box_ops.elementwise_box_iou(a[:5], b), iou[:5].diagonal())
    torch.testing.assert_close(
        box_ops.elementwise_generalized_box_iou(a[:5], b), giou[:5].diagonal()
    )


def test_degenerate_boxes_give_the_limits_of_the_formula():
    """Zero-area boxes: IoU 0 (0 / 0 taken as 0); GIoU = IoU - (hull - union) / hull, with an
    empty hull counting as 0. A point inside a box has hull = union: GIoU 0; a point outside has
    GIoU = -(hull - box) / hull."""
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]], dtype=torch.float64)
    far = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert box_ops.pairwise_box_iou(point, point).item() == 0
    assert box_ops.pairwise_generalized_box_iou(point, point).item() == 0
    assert box_ops.pairwise_box_iou(point, box).item() == 0
    assert box_ops.pairwise_generalized_box_iou(point, box).item() == 0
    hull, union = 0.75 * 0.75, 0.25
    assert box_ops.pairwise_generalized_box_iou(far, box).item() == pytest.approx(
        -(hull - union) / hull, rel=1e-12
    )
    assert box_ops.pairwise_generalized_box_iou(far, box).item() == pytest.approx(
        ref.giou(far[0].tolist(), box[0].tolist()), rel=1e-12
    )


def test_eps_is_added_to_union_and_hull_as_in_the_release():
    """eps = 1e-6 (the release's losses and costs) against the plain-Python formula; on boxes of
    about 1e-3 x 1e-3 (area 1e-6) it changes IoU by about half, so ignoring it is caught."""
    g = torch.Generator().manual_seed(2)
    eps = ref.RELEASE_IOU_EPS
    for scale in (1.0, 1e-3):
        a = box_ops.box_cxcywh_to_xyxy(random_boxes(6, g) * scale)
        b = box_ops.box_cxcywh_to_xyxy(random_boxes(4, g) * scale)
        iou = box_ops.pairwise_box_iou(a, b, eps)
        giou = box_ops.pairwise_generalized_box_iou(a, b, eps)
        for i, box_a in enumerate(a.tolist()):
            for j, box_b in enumerate(b.tolist()):
                assert iou[i, j].item() == pytest.approx(ref.iou(box_a, box_b, eps), abs=1e-14)
                assert giou[i, j].item() == pytest.approx(ref.giou(box_a, box_b, eps), abs=1e-14)
        torch.testing.assert_close(
            box_ops.elementwise_generalized_box_iou(a[:4], b, eps), giou[:4].diagonal()
        )
    same = torch.tensor([[0.0, 0.0, 1e-3, 1e-3]], dtype=torch.float64)
    assert box_ops.pairwise_box_iou(same, same, eps).item() == pytest.approx(0.5, rel=1e-12)
    assert box_ops.pairwise_box_iou(same, same).item() == 1.0
