"""torch.compile of the transformer layers: no graph breaks (fullgraph=True), same results."""

from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch._dynamo.utils import counters

from tests.modeling.test_wiring import batch

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py"


def demo_model():
    cfg = LazyConfig.load(str(DEMO))
    cfg.model.num_classes = 5
    torch.manual_seed(0)
    return instantiate(cfg.model).train()


def test_one_encoder_and_one_decoder_layer_compile_without_graph_breaks():
    model = demo_model()
    g = torch.Generator().manual_seed(0)
    shapes, starts = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]]), torch.tensor([0, 64, 80, 84])
    src = torch.randn(2, 85, 128, generator=g)
    encoder_args = (src, torch.randn(2, 85, 128, generator=g), torch.rand(2, 85, 4, 2, generator=g),
                    shapes, starts, None)  # fmt: skip
    query = torch.randn(2, 10, 128, generator=g)
    boxes = torch.rand(2, 10, 4, 4, generator=g) * 0.5 + 0.25
    decoder_args = (query, torch.randn(2, 10, 128, generator=g), boxes, src, shapes, starts, None,
                    [4, 6])  # fmt: skip
    for layer, args in ((model.encoder.layers[0], encoder_args),
                        (model.decoder.layers[0], decoder_args)):  # fmt: skip
        torch._dynamo.reset()
        # fullgraph=True raises at the first graph break.
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        eager_out = layer(*args)
        compiled_out = compiled(*args)
        torch.testing.assert_close(compiled_out, eager_out)
        eager_grads = torch.autograd.grad(eager_out.sum(), list(layer.parameters()))
        compiled_grads = torch.autograd.grad(compiled_out.sum(), list(layer.parameters()))
        for a, b in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_layers_keeps_names_and_results():
    eager, compiled = demo_model(), demo_model()
    names = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_layers(backend="aot_eager")
    assert list(compiled.state_dict()) == names  # checkpoints keep their names
    torch.manual_seed(1)
    expected = eager(batch())
    torch.manual_seed(1)
    got = compiled(batch())
    # One graph per layer class: the first decoder layer's inputs (the content queries, the
    # positional queries) are laid out as the later layers' are, so it is not compiled again.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_train_compile_compiles_the_layers_of_the_trained_model(tmp_path, monkeypatch):
    from rankdetr.data import register_shapes_dataset
    from rankdetr.engine.runner import do_train, load_config
    from rankdetr.modeling.rank_detr import RankDETR

    calls = []
    monkeypatch.setattr(RankDETR, "compile_layers", lambda self, **kw: calls.append(self))
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 2})
    overrides = ["train.compile=True", "train.max_iter=1", "train.eval_period=0",
                 f"train.output_dir={tmp_path / 'out'}", "dataloader.train.total_batch_size=2",
                 "dataloader.train.num_workers=0", "model.num_queries=10",
                 "model.num_queries_one2many=20", "model.num_detections=10"]  # fmt: skip
    do_train(load_config(str(DEMO), overrides))
    assert len(calls) == 1 and isinstance(calls[0], RankDETR)
