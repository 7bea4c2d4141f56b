"""tools/model_stats.py: inference parameters, the flop handles against hand formulas, the table."""

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn

from rankdetr._ext import extension_available
from rankdetr.layers.ms_deform_attn_op import ms_deform_attn_reference
from rankdetr.modeling.rank_options import RankOptions
from tests.conftest import REPO_ROOT, load_tool
from tests.modeling.test_rank_detr import tiny_model
from tests.test_predictor import DEMO_CONFIG, TINY_OVERRIDES

TOOL = REPO_ROOT / "tools" / "model_stats.py"
# N batch, Lq queries, H heads, L levels, P points, D channels per head; levels of 3x4, 2x2, 1x1.
N, LQ, H, L, P, D = 2, 7, 4, 3, 2, 8
SHAPES = [(3, 4), (2, 2), (1, 1)]


@pytest.fixture(scope="module")
def stats():
    return load_tool(TOOL, "model_stats")


@pytest.mark.parametrize("rch,qrl", [(True, True), (False, False), (True, False)])
def test_inference_parameters_drop_the_one_to_many_rows(stats, rch, qrl):
    model = tiny_model(RankOptions(rch=rch, qrl=qrl), num_classes=3)  # 6 + 12 queries, 2 layers
    total = sum(p.numel() for p in model.parameters())
    # Per extra query: a content embedding (32), an RCH bias per layer (2 x 3 classes), a QRL
    # embedding per layer after the first (1 x 32).
    per_query = 32 + (2 * 3 if rch else 0) + (32 if qrl else 0)
    assert stats.inference_parameter_count(model) == total - 12 * per_query
    assert stats.inference_parameter_count(nn.Linear(3, 4)) == 16


class DeformAttnOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.register_buffer("spatial_shapes", torch.tensor(SHAPES))
        self.register_buffer("level_start_index", torch.tensor([0, 12, 16]))

    def forward(self, value, locations, weights):
        return self.op(value, self.spatial_shapes, self.level_start_index, locations, weights)


def deform_attn_inputs():
    g = torch.Generator().manual_seed(0)
    value = torch.randn(N, sum(h * w for h, w in SHAPES), H, D, generator=g)
    locations = torch.rand(N, LQ, H, L, P, 2, generator=g)
    weights = torch.rand(N, LQ, H, L, P, generator=g)
    return value, locations, weights


def count(stats, module, inputs):
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**stats.FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    return analysis.total(), analysis.unsupported_ops()


@pytest.mark.skipif(not extension_available(), reason="needs the compiled rankdetr._C")
def test_ms_deform_attn_handle_counts_bilinear_samples(stats):
    module = DeformAttnOp(torch.ops.rankdetr.ms_deform_attn_forward)
    total, uncounted = count(stats, module, deform_attn_inputs())
    # 2 * 7 * 4 * 3 * 2 = 336 sampling points x 8 channels x (4 corners + 1 weight)
    assert total == 336 * 8 * 5 == 13440
    assert "rankdetr::ms_deform_attn_forward" not in uncounted


def test_the_pure_pytorch_fallback_counts_its_grid_samples(stats):
    total, _ = count(stats, DeformAttnOp(ms_deform_attn_reference), deform_attn_inputs())
    assert total == 336 * 8 * 4  # bilinear reads; the weighting is elementwise (not counted)


def test_scaled_dot_product_attention_handle(stats):
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 3)
    total, _ = count(stats, Attention(), (q, k, v))
    assert total == 2 * 4 * (5 * 6 * 8 + 5 * 6 * 3)  # Q K^T, then attention x V


def test_prints_the_table_for_the_demo_config(stats, capsys):
    # 2000 one-to-many queries: enough training-only rows to show in the table's 2 decimals.
    overrides = [*TINY_OVERRIDES, "model.num_queries_one2many=2000"]
    argv = ["--config-file", DEMO_CONFIG, "--image-size", "64", "96", "--warmup", "0",
            "--repeats", "1", "--verbose", *overrides]  # fmt: skip
    assert stats.main(argv) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|")))
    cells = {key.strip(): value.strip() for key, value in cells.items()}
    torch.manual_seed(0)
    from rankdetr.engine.runner import build_model, load_config

    model = build_model(load_config(DEMO_CONFIG, overrides))
    total = sum(p.numel() for p in model.parameters())
    # 2000 extra queries x (32 content + 2 layers x 5 classes RCH + 1 x 32 QRL) = 0.148 M
    assert cells["params (M)"] == f"{(total - 2000 * 74) / 1e6:.2f}"
    assert cells["all params (M)"] == f"{total / 1e6:.2f}"
    assert cells["input"] == "64x96" and float(cells["GFLOPs"]) > 0 and float(cells["FPS"]) > 0
    assert "ms_deform_attn" not in out and "scaled_dot_product" not in out  # all counted


def test_a_bad_config_is_reported(stats, tmp_path, capsys):
    assert stats.main(["--config-file", str(tmp_path / "nope.py")]) == 1
    assert "nope.py" in capsys.readouterr().err
