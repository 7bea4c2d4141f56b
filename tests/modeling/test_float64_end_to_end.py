"""A float64 run is float64 end to end; float32 and bf16 runs keep the release's float32 tables.

Why it matters: PyTorch computes float32 sin, cos, log and pow through MKL's vector math, whose
code path (and so the last bit) depends on the CPU. A float32 table inside a float64 run moves
its outputs by ~1e-8, so the float64 fixture comparisons (1e-10) would hold on some CPUs only.

* The dispatch spy records every op output of dtype float32 or half during a float64 training
  step (forward + backward) and an inference of the release-tiny and DINO-tiny models (denoising
  on), on a padded batch. A float32 tensor with more than one element may only come from the
  named exceptions in `FLOAT32_SOURCES`, or be computed from such tensors alone.
* The same spy, with the release's float32 tables patched in, finds each of them (so it can
  fail).
* Float32 runs (the demo, release-tiny and DINO-tiny models, denoising on) and a bf16-autocast
  run (the demo model) give bit-identical detections, losses and gradients with our tables and
  with the release's float32 tables patched in.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.checkpoint import test_dino_fixture, test_release_fixture
from tests.release_float32_tables import patch_release_float32_tables

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo" / "rank_detr_r18_shapes.py"
RELEASE_TABLES = REPO / "tests" / "release_float32_tables.py"
NUM_CLASSES = 5

# The sizes of ../shared/reference/{release,dino}-tiny (their READMEs), so that these tests run
# without the reference files.
TINY = {
    "width": 16, "depth": 18, "embed_dim": 256, "num_heads": 8, "ffn_dim": 128,
    "encoder_layers": 2, "decoder_layers": 3, "num_queries": 12, "num_classes": NUM_CLASSES,
    "num_points": 4, "num_levels": 4, "norm_groups": 32,
}  # fmt: skip
RELEASE_TINY = {**TINY, "num_queries_one2many": 36, "one2many_repeats": 3,
                "hmc_change_iter": 67500, "max_iter": 90000}  # fmt: skip
DINO_TINY = {**TINY, "dn_number": 6, "label_noise_ratio": 0.5, "box_noise_scale": 1.0}

# Where a float64 run may make float32 tensors: (file, function) of the innermost frames.
FLOAT32_SOURCES = {
    # Targets: detectron2's `Boxes` hold float32; they are normalised by exactly rounded float32
    # divisions (the same on every CPU), as in the release, and lifted where they meet
    # predictions.
    ("rankdetr/modeling/detector_base.py", "prepare_targets"),
    # Detections: detectron2's `Boxes` (float32), made from the float64 boxes, and clipped.
    ("rankdetr/modeling/detector_base.py", "postprocess"),
    # DINO's denoising noise: uniform float32 draws in every run, lifted exactly.
    ("rankdetr/modeling/denoising.py", "_rand"),
}
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


class Float32Spy(TorchDispatchMode):
    """Records op outputs in float32 or half precision that are not allowed (module docstring).

    An output is allowed if it is made inside one of `FLOAT32_SOURCES`, or if every floating
    tensor the op read is an allowed low-precision tensor (the batch's own `Boxes` count as
    allowed). `found` maps (op, innermost rankdetr frame) to the largest number of elements.
    """

    def __init__(self, allowed_inputs):
        super().__init__()
        self.allowed = {id(t): t for t in allowed_inputs}  # values keep the ids unique
        self.found: dict[tuple[str, str], int] = {}
        self.ops_seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops_seen.add(str(func))
        inputs = [
            t
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        derived = bool(inputs) and all(id(t) in self.allowed for t in inputs)
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in LOW_PRECISION:
                continue
            frames = _rankdetr_frames()
            if derived or any(frame in FLOAT32_SOURCES for frame in frames):
                self.allowed[id(tensor)] = tensor
            elif tensor.numel() > 1:
                where = ":".join(frames[0]) if frames else "outside rankdetr"
                key = (str(func), where)
                self.found[key] = max(self.found.get(key, 0), tensor.numel())
        return out


def _rankdetr_frames() -> list[tuple[str, str]]:
    """(file relative to the repository, function) of the frames in rankdetr (and in the
    release's tables of the tests), innermost first."""
    frames = []
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(REPO / "rankdetr") or path == RELEASE_TABLES:
            frames.append((path.relative_to(REPO).as_posix(), frame.name))
    return frames


def padded_batch(seed: int = 0) -> list[dict]:
    """Two images of different sizes (so the second is padded), three boxes each."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for h, w in [(96, 128), (120, 88)]:
        instances = Instances((h, w))
        corner = torch.rand(3, 2, generator=g) * torch.tensor([w / 2, h / 2])
        instances.gt_boxes = Boxes(torch.cat([corner, corner + 20], 1))
        instances.gt_classes = torch.randint(0, NUM_CLASSES, (3,), generator=g)
        inputs.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": instances})
    return inputs


def release_tiny():
    torch.manual_seed(0)
    return test_release_fixture.build_model(RELEASE_TINY)


def dino_tiny():
    torch.manual_seed(0)
    return test_dino_fixture.build_model(DINO_TINY)


def demo_model():
    cfg = LazyConfig.load(str(DEMO))
    cfg.model.num_classes = NUM_CLASSES
    torch.manual_seed(0)
    return instantiate(cfg.model)


def float32_tensors_of_a_float64_step(model) -> Float32Spy:
    """Spies on a float64 training step (forward + backward) and a float64 inference."""
    model = model.double()
    batch = padded_batch()
    spy = Float32Spy([x["instances"].gt_boxes.tensor for x in batch])
    with spy:
        model.train()
        model.set_training_progress(0.9)  # HMC on
        losses = model(batch)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            model(batch)
    assert all(v.dtype == torch.float64 for v in losses.values())
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)
    return spy


@pytest.mark.parametrize("build", [release_tiny, dino_tiny], ids=["release_tiny", "dino_tiny"])
def test_a_float64_step_makes_float32_tensors_only_in_the_named_exceptions(build):
    spy = float32_tensors_of_a_float64_step(build())
    # The spy saw the backward pass too (else it could miss float32 gradients).
    assert "aten.convolution_backward.default" in spy.ops_seen
    assert "rankdetr.ms_deform_attn_backward.default" in spy.ops_seen or any(
        "ms_deform_attn_backward" in op for op in spy.ops_seen
    )
    assert spy.found == {}, "float32 tensors in a float64 run:\n" + "\n".join(
        f"  {op} at {where}: {n} elements" for (op, where), n in sorted(spy.found.items())
    )


def test_the_spy_finds_each_float32_table_of_the_release(monkeypatch):
    """With the release's float32 tables patched in, the spy reports every one of them."""
    patch_release_float32_tables(monkeypatch)
    found = float32_tensors_of_a_float64_step(release_tiny()).found
    places = {where.split(":")[-1] for _, where in found}
    assert {
        "release_position_embedding",
        "release_interleaved_sin_cos",
        "release_grid_proposals",
        "release_valid_ratio",
        "release_giou_aware_focal_loss",
    } <= places, places


def outputs_of_a_step(model, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Detections (eval), losses and every gradient (train) on the padded batch."""
    results = {}
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.eval()
        with torch.no_grad():
            detections = model(batch)
        model.train()
        model.zero_grad()
        torch.manual_seed(1)
        losses = model(batch)
    for i, d in enumerate(detections):
        results[f"boxes_{i}"] = d["instances"].pred_boxes.tensor
        results[f"scores_{i}"] = d["instances"].scores
        results[f"classes_{i}"] = d["instances"].pred_classes
    sum(losses.values()).backward()
    results.update({name: value.detach() for name, value in losses.items()})
    results.update(
        {f"grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    )
    return results


@pytest.mark.parametrize(
    "build, autocast",
    [(demo_model, False), (demo_model, True), (release_tiny, False), (dino_tiny, False)],
    ids=["demo_float32", "demo_bf16_autocast", "release_tiny_float32", "dino_tiny_float32"],
)
def test_float32_and_bf16_runs_are_bit_identical_to_the_release_tables(build, autocast):
    ours = outputs_of_a_step(build(), autocast)
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_release_float32_tables(monkeypatch)
        release = outputs_of_a_step(build(), autocast)
    assert sorted(ours) == sorted(release)
    assert len(ours) > 100
    different = [name for name in ours if not torch.equal(ours[name], release[name])]
    assert not different, f"{len(different)} outputs differ, e.g. {different[:5]}"
