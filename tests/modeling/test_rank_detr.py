"""RankDETR end to end on CPU: all 16 rank-flag combinations train and infer on a tiny config."""

import itertools

import pytest
import torch
from detectron2.structures import Boxes, Instances

from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions


def tiny_model(rank: RankOptions, num_classes=3, **query_counts) -> RankDETR:
    """A narrow RankDETR on ResNet-18; `query_counts` overrides the query and detection counts."""
    torch.manual_seed(0)
    counts = {"num_queries": 6, "num_queries_one2many": 12, "one2many_repeats": 2,
              "num_detections": 10, **query_counts}  # fmt: skip
    backbone = ResNetBackbone(depth=18)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=32, norm_groups=8)
    return RankDETR(
        backbone=backbone,
        neck=neck,
        num_classes=num_classes,
        rank=rank,
        embed_dim=32,
        num_heads=4,
        num_points=2,
        ffn_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        **counts,
    )


def batch():
    inputs = []
    for (h, w), boxes, classes in [
        ((64, 96), [[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]], [0, 2]),
        ((80, 64), [[10.0, 10.0, 30.0, 70.0]], [1]),
    ]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        inputs.append({"image": image, "instances": instances, "height": h * 2, "width": w * 2})
    return inputs


FLAGS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize(
    "rch,qrl,gcl,hmc", FLAGS, ids=["".join("1" if f else "0" for f in x) for x in FLAGS]
)
def test_every_flag_combination_trains_and_infers(rch, qrl, gcl, hmc):
    model = tiny_model(RankOptions(rch=rch, qrl=qrl, gcl=gcl, hmc=hmc, hmc_start=0.5))
    model.set_training_progress(0.6)
    # Each flag reaches its part (tests/modeling/test_wiring.py shows each changes the result).
    assert model.criterion.matcher.use_high_order == hmc
    assert (model.decoder.rank_class_bias is not None) == rch
    assert (model.decoder.rank_content_query is not None) == qrl
    assert model.decoder.sorts_queries == (rch or qrl)
    assert model.criterion.classification_loss == ("gcl" if gcl else "focal")
    model.train()
    losses = model(batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert "o2m_loss_class" in losses and "loss_class_enc" in losses and "loss_giou_0" in losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        results = model(batch())
    assert len(results) == 2
    for result, (h, w) in zip(results, [(128, 192), (160, 128)]):
        instances = result["instances"]
        assert instances.image_size == (h, w) and len(instances) == 10
        assert (instances.pred_boxes.tensor[:, 2] <= w).all()
        assert (instances.scores[:-1] >= instances.scores[1:]).all()


def test_inference_does_not_change_module_state():
    model = tiny_model(RankOptions()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = (model.num_queries, model.num_queries_one2many)
    with torch.no_grad():
        model(batch())
    assert attributes == (model.num_queries, model.num_queries_one2many)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_all_flags_off_has_no_rank_parameters():
    plain = tiny_model(RankOptions(rch=False, qrl=False, gcl=False, hmc=False))
    full = tiny_model(RankOptions())
    plain_names = {n for n, _ in plain.named_parameters()}
    extra = {n for n, _ in full.named_parameters()} - plain_names
    assert extra and all(n.startswith("decoder.rank_") for n in extra)
    assert plain.criterion.classification_loss == "focal"
    assert plain.criterion.matcher.high_order_start is None


def test_rank_options_are_validated():
    with pytest.raises(ValueError, match="hmc_start"):
        RankOptions(hmc_start=67500)
    with pytest.raises(ValueError, match="varifocal"):
        RankOptions(varifocal=True)
    assert RankOptions(gcl=False, varifocal=True).classification_loss == "varifocal"
