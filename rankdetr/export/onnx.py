"""ONNX export of a built detector (:class:`~rankdetr.modeling.rank_detr.RankDETR` or
:class:`~rankdetr.modeling.dino.DINO`): the whole inference in one graph.

Contract of the exported graph:

* input ``image``: float32 (N, 3, H, W), pixel values 0..255 in the channel order the model was
  trained with (the config's ``dataloader.test.mapper.img_format``), already resized by the
  test transform (resizing stays outside the graph, as in detectron2's exporters). Every image
  of a batch has the input size: there is no padding (the padding mask is all False).
* outputs ``boxes`` float32 (N, D, 4) XYXY in pixels of the input, clipped to it; ``scores``
  float32 (N, D), sigmoid probabilities, descending; ``labels`` int64 (N, D) contiguous class
  indices; D = the model's ``num_detections`` (top over query x class, as its own
  post-processing).
* N, H and W are dynamic: H and W at least 64, and the feature levels together must hold at
  least ``num_queries`` positions (about H * W / 48 for strides 8..64; e.g. 320x320 for 900
  queries), else ONNX Runtime's TopK refuses the input. Exported with ``input_shape=(N, H, W)``
  (``tools/export_onnx.py --input-shape N H W``) the graph takes exactly (N, 3, H, W) instead:
  every shape in it is a constant, for runtimes that want static shapes (see
  :func:`export_onnx`).
* metadata (``model.metadata_props``): ``rankdetr.image_format``, ``rankdetr.test_augmentation``
  (JSON of the config's test augmentations), ``rankdetr.class_names`` (JSON list),
  ``rankdetr.num_detections``, ``rankdetr.input_contract``, for a fixed-shape graph
  ``rankdetr.input_shape`` (JSON [N, 3, H, W]) and, where given, ``rankdetr.config``.

How the graph stays right at every input size: our model code turns level sizes into Python
ints (``spatial_shapes.tolist()`` in the deformable attention's reference, the two-stage grid and
the encoder's reference points), which a tracer would bake in as the constants of the traced
size: at another size the result would silently be wrong. During the export (and in the eager
run of :class:`ExportableDetector`, so that both agree), :func:`export_code_paths` routes those
functions through their ``level_shapes`` argument, filled with the feature maps' own shapes
(symbolic under the exporter), and replaces the compiled deformable-attention op by
:func:`~rankdetr.layers.ms_deform_attn_op.ms_deform_attn_reference` (one ``GridSample`` per level,
``align_corners=False``, zero padding: standard ONNX from opset 16), whose sampling it traces as
one op (:func:`opaque_bilinear_samples`: ~20 % less export time).

Exporter choice, by measurement (demo Rank-DETR, torch 2.14.1, 2 CPU cores, exported at
2x3x320x320, run in ONNX Runtime 1.32 at 1x320x320, 1x288x416 and 2x512x384):

* ``dynamo=True`` (torch.export, non-strict, then onnxscript): exports in ~32 s to 1295 nodes
  (20.5 MB with the weights inside; figures of the 2-encoder-layer demo before
  :func:`fold_constants_and_clean_up`), all in the standard domain, and is right at every size and
  batch: largest differences to PyTorch 6e-5 px (boxes) and 3e-7 (scores), labels equal. Its
  one gap, the decoders' stable argsort (``aten.sort.stable``), gets a translation to ONNX TopK
  here (:func:`_translations`). Sizes are symbolic ints, so the level shapes routed
  by :func:`export_code_paths` stay symbolic.
* ``dynamo=False`` (TorchScript tracer): fails on the same stable argsort ("Sort, Out parameter
  is not supported"); with a hand-written argsort -> TopK symbolic it exports in ~4 s, but to
  3575 nodes (18.6 MB), and its detections are wrong at every size tried (boxes off by up to
  487 px, scores by 1e-2, a third to a half of the labels differ): the tracer still bakes in
  shape-derived Python ints (loop bounds, meshgrids, slices) at the traced size.

So :func:`export_onnx` uses the dynamo exporter; it costs a slower export, once per model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rankdetr.errors import UserError
from rankdetr.layers import multi_scale_deform_attn
from rankdetr.layers.box_ops import box_cxcywh_to_xyxy
from rankdetr.layers.dtypes import at_least_float32
from rankdetr.layers.ms_deform_attn_op import bilinear_samples, ms_deform_attn_reference
from rankdetr.modeling import dino, encoder, two_stage
from rankdetr.modeling.detector_base import level_start_index

__all__ = [
    "ExportableDetector",
    "ExportResult",
    "InputShapeError",
    "OnnxDependencyError",
    "check_onnx",
    "custom_domain_ops",
    "export_code_paths",
    "export_onnx",
    "fixed_input_shape",
    "fold_constants_and_clean_up",
    "read_metadata",
    "require_onnx_packages",
    "CHECK_SIZES",
    "TOLERANCES",
]

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
# --check sizes (H, W) and limits: scores absolute, boxes in pixels; labels must agree where the
# score gap to the next detection exceeds the score limit (else ties may swap them).
CHECK_SIZES = ((320, 320), (288, 416), (512, 384))
TOLERANCES = {"scores": 1e-4, "boxes": 0.01}
DEFAULT_OPSET = 18
METADATA_PREFIX = "rankdetr."


class InputShapeError(UserError, ValueError):
    """A fixed input shape that the export or the check cannot take; the message names it."""


class OnnxDependencyError(UserError, ImportError):
    """onnx / onnxruntime / onnxscript missing; the message names the package and the extra."""


def require_onnx_packages(*names: str) -> None:
    """Import each of `names` (default: onnx, onnxruntime, onnxscript) or raise
    :class:`OnnxDependencyError` naming the first missing one."""
    for name in names or ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise OnnxDependencyError(
                f"the ONNX export needs the package {name!r}, which is not installed: "
                "pip install -e '.[onnx]' (or pip install onnx onnxruntime onnxscript)"
            ) from error


# --- the export code paths ------------------------------------------------------------------


@dataclass
class _LevelShapes:
    """The (h, w) of each feature level of the current forward, as the feature maps' shape ints
    (symbolic while exporting); set by the unpadded flattening, read by the patched functions."""

    shapes: list[tuple[int, int]] = field(default_factory=list)


def _flatten_unpadded_levels(model: nn.Module, level_shapes: _LevelShapes, features, _mask):
    """:meth:`DeformableDetector.flatten_levels` for unpadded images, without host reads.

    Levels (N, C, h_l, w_l) -> src (N, S, C), pos (N, S, C), mask (N, S) all False,
    spatial_shapes (L, 2) int64 computed in the graph from the maps' shapes, level_start_index
    (L,), valid_ratios (N, L, 2) all 1 (nothing is padded). Records the level shapes for the
    patched functions. The sine table is the same call on the same all-False mask as the eager
    path, so the embeddings are the same numbers.
    """
    table_dtype = at_least_float32(features[0].dtype)
    level_shapes.shapes = [(f.shape[-2], f.shape[-1]) for f in features]
    masks = [torch.zeros_like(f[:, 0], dtype=torch.bool) for f in features]  # (N, h, w)
    src, pos, mask = model.embed_levels(features, masks, table_dtype)
    spatial_shapes = torch.stack([shape_tensor(f, [-2, -1]) for f in features])
    n = features[0].shape[0]
    valid_ratios = features[0].new_ones(n, len(features), 2, dtype=table_dtype)
    return src, pos, mask, spatial_shapes, level_start_index(spatial_shapes), valid_ratios


@torch.library.custom_op("rankdetr::bilinear_samples", mutates_args=())
def opaque_bilinear_samples(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """:func:`~rankdetr.layers.ms_deform_attn_op.bilinear_samples` as one op for the tracer.

    Why: under symbolic shapes torch.export works out ``aten.grid_sampler_2d``'s output by
    tracing its Python decomposition (~3000 symbolic-int operations a call), once when capturing
    and again when the ONNX exporter decomposes the graph; this op's shape comes from
    :func:`_bilinear_samples_shape` instead. Exported as the same ONNX ``GridSample``
    (:func:`_translations`)."""
    return bilinear_samples(value, grid)


@opaque_bilinear_samples.register_fake
def _bilinear_samples_shape(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w), (N, Lq, P, 2) -> an empty (N, D, Lq, P)."""
    return value.new_empty(value.shape[0], value.shape[1], grid.shape[1], grid.shape[2])


def _reference_attention(level_shapes: _LevelShapes, value, spatial_shapes, starts, locs, w):
    """ms_deform_attn for export: the grid_sample reference with the recorded level shapes."""
    return ms_deform_attn_reference(
        value,
        spatial_shapes,
        starts,
        locs,
        w,
        level_shapes=level_shapes.shapes,
        sample_level=opaque_bilinear_samples,
    )


def _with_level_shapes(function, level_shapes: _LevelShapes):
    """`function(...)` called with `level_shapes=` the recorded shapes of the current forward."""

    def call(*args, **kwargs):
        return function(*args, level_shapes=level_shapes.shapes, **kwargs)

    return call


def _top_k_proposals(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, S) -> (N, k) best first. Export form of top_proposal_indices without its Python
    branch on S (a traced branch would be fixed at the export size); S >= k is required."""
    return scores.topk(k, dim=1).indices


@contextlib.contextmanager
def export_code_paths(model: nn.Module) -> Iterator[None]:
    """Within: `model` flattens its levels unpadded with graph-computed shapes, and the
    deformable attention (reference op), the two-stage grid, the proposal top-k and the
    encoder's reference points read the level sizes from the feature maps' shapes instead of
    the host. Everything is restored on exit; not thread-safe (it patches module attributes)."""
    level_shapes = _LevelShapes()
    patches = [
        (model, "flatten_levels", partial(_flatten_unpadded_levels, model, level_shapes)),
        (
            multi_scale_deform_attn,
            "ms_deform_attn",
            partial(_reference_attention, level_shapes),
        ),
        (
            encoder,
            "encoder_reference_points",
            _with_level_shapes(encoder.encoder_reference_points, level_shapes),
        ),
        (two_stage, "grid_proposals", _with_level_shapes(two_stage.grid_proposals, level_shapes)),
        (dino, "grid_proposals", _with_level_shapes(dino.grid_proposals, level_shapes)),
        (two_stage, "top_proposal_indices", _top_k_proposals),
        (dino, "top_proposal_indices", _top_k_proposals),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            if original is None:  # an instance attribute shadowing the method: remove it
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def shape_tensor(tensor: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """(len(dims),) int64 sizes of `tensor` along `dims`, as values of the traced graph.

    The TorchScript tracer records `_shape_as_tensor` as a Shape node, but a tensor built from
    `tensor.shape` ints would be a constant of the traced size; torch.export instead carries
    the sizes as symbolic ints, from which `torch.tensor` builds graph values (it cannot trace
    `_shape_as_tensor`)."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(tensor)[dims]
    return torch.tensor([tensor.shape[d] for d in dims], device=tensor.device)


# --- the exported module --------------------------------------------------------------------


class ExportableDetector(nn.Module):
    """A built RankDETR / DINO as one tensor function: image -> (boxes, scores, labels).

    See the module docstring for the contract. The wrapped model is put in eval mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()  # the exporter warns about (and BN would run) training mode otherwise

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image: (N, 3, H, W) float32, pixels 0..255 in the model's channel order.

        Returns:
            boxes (N, D, 4) XYXY input pixels, scores (N, D) descending, labels (N, D) int64.
        """
        model = self.model
        images = (image.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        padding_mask = torch.zeros_like(images[:, 0], dtype=torch.bool)  # (N, H, W)
        with export_code_paths(model):
            outputs = model.predict(images, padding_mask)
        logits = outputs["logits"][-1][:, : model.num_queries].float()
        boxes = outputs["boxes"][-1][:, : model.num_queries].float()
        return top_detections(logits, boxes, image, model.num_detections)


def top_detections(
    logits: torch.Tensor, boxes: torch.Tensor, image: torch.Tensor, num_detections: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's post-processing in tensors: top D over (query, class) of the sigmoid scores.

    Args:
        logits: (N, Q, K) last-layer class logits; boxes: (N, Q, 4) normalised cxcywh.
        image: (N, 3, H, W) the input, for its size.
        num_detections: D (at most Q * K are kept).

    Returns:
        boxes (N, D, 4) XYXY pixels clipped to the image, scores (N, D), labels (N, D) int64.
    """
    num_classes = logits.shape[-1]
    k = min(num_detections, logits.shape[1] * num_classes)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    query, labels = index // num_classes, index % num_classes
    chosen = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    # (W, H, W, H) from the input's shape, kept in the graph so that it follows the input size.
    size = shape_tensor(image, [3, 2, 3, 2]).to(chosen.dtype)
    xyxy = box_cxcywh_to_xyxy(chosen) * size
    xyxy = torch.minimum(xyxy.clamp(min=0), size)  # as Boxes.clip in the model's postprocess
    return xyxy, scores, labels


def _translations():
    """The exporter's translations of two ops it has none for:

    * aten.sort.stable (our decoders' stable argsort of the ranking scores) as ONNX TopK over
      the whole axis. TopK breaks ties by the lower index, exactly a stable sort's order.
    * rankdetr::bilinear_samples (:func:`opaque_bilinear_samples`) as the ``GridSample`` the
      exporter writes for ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``).
    """
    from onnxscript import opset18 as op

    def sort_stable(self, stable=None, dim=-1, descending=False):
        size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim)), [1])
        return op.TopK(self, size, axis=dim, largest=1 if descending else 0, sorted=1)

    def grid_sample(value, grid):
        return op.GridSample(value, grid, align_corners=0, mode="bilinear", padding_mode="zeros")

    return {
        torch.ops.aten.sort.stable: sort_stable,
        torch.ops.rankdetr.bilinear_samples.default: grid_sample,
    }


# --- export, metadata, check ----------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, the seconds it took, its nodes and bytes."""

    path: Path
    seconds: float
    num_nodes: int
    num_bytes: int


def _sample_shape(sample_size, input_shape) -> tuple[int, int, int, int]:
    """(N, 3, H, W) of the export's sample images: `input_shape` (N, H, W) when given (checked:
    N >= 1, H and W >= 64 as in :func:`_dynamic_shapes`), else a batch of 2 at `sample_size`."""
    if input_shape is None:
        return (2, 3, *sample_size)
    if len(input_shape) != 3:
        raise InputShapeError(f"input_shape {tuple(input_shape)}: give (N, H, W)")
    n, h, w = (int(v) for v in input_shape)
    if n < 1 or h < 64 or w < 64:
        raise InputShapeError(
            f"input_shape {(n, h, w)}: N >= 1, H and W >= 64 (the stride-64 level)"
        )
    return (n, 3, h, w)


def _dynamic_shapes() -> dict:
    """Batch, height and width of `image` free (64 px at least: the coarsest level, stride 64
    with a 3x3 stride-2 conv, must keep a pixel)."""
    dim = torch.export.Dim
    return {
        "image": {
            0: dim("batch", min=1, max=1024),
            2: dim("height", min=64, max=8192),
            3: dim("width", min=64, max=8192),
        }
    }


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    sample_size: tuple[int, int] = (320, 320),
    input_shape: tuple[int, int, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export `model` (RankDETR / DINO) with torch's dynamo exporter to `path`.

    Args:
        model: a built detector (its weights loaded); put in eval mode.
        path: the .onnx file to write (weights inside it, no external data file).
        opset: ONNX opset (>= 16 for GridSample; the dynamo exporter writes 18 natively).
        sample_size: (H, W) of the random sample images a dynamic export traces with; a batch
            of 2 (a batch of 1 would be specialised to 1 by torch.export).
        input_shape: (N, H, W) for a fixed-shape graph that takes exactly (N, 3, H, W) images
            and holds no symbolic shapes; None (default): N, H and W dynamic. Why offer it:
            TensorRT-style runtimes and accelerators want static shapes, and without symbolic
            sizes torch.export has far less to trace (demo network, 2 cores: 20 s and 824 nodes
            against 49 s and 1268 nodes; ONNX Runtime gives the same numbers bit for bit at
            that shape, README).
        metadata: extra `metadata_props` entries (see :func:`config_metadata`).
    """
    require_onnx_packages()
    if opset < 16:
        raise ValueError(f"opset {opset}: GridSample (the deformable attention) needs >= 16")
    path = Path(path)
    wrapper = ExportableDetector(model)
    shape = _sample_shape(sample_size, input_shape)  # InputShapeError before any tracing
    sample = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 255
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (sample.to(model.pixel_mean.device),),
            dynamo=True,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes=None if input_shape else _dynamic_shapes(),
            opset_version=opset,
            custom_translation_table=_translations(),
            optimize=False,  # fold_constants_and_clean_up below, with a few of its rewrite rules
        )
    fold_constants_and_clean_up(program.model)
    program.save(str(path), external_data=False)
    seconds = time.perf_counter() - start
    entries = {"input_contract": INPUT_CONTRACT, "num_detections": str(model.num_detections)}
    if input_shape:
        entries["input_shape"] = json.dumps(list(shape))
    write_metadata(path, {**entries, **(metadata or {})})
    import onnx

    num_nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return ExportResult(path, seconds, num_nodes, path.stat().st_size)


def fold_constants_and_clean_up(model, iterations: int = 2) -> None:
    """onnxscript's graph optimisation with a few of its rewrite rules, in place on an
    ``onnx_ir`` model: inline functions; `iterations` rounds of constant folding (shape arithmetic
    above all), the rules below and removal of unused nodes, functions and opsets; then lift
    constants to initializers, deduplicate them, eliminate common subexpressions and fix names,
    as ``optimize=True`` does.

    The rules: the six that changed the demo graph when all ~46 default rules were tried one by
    one (reshape-shape materialisation, Unsqueeze merges, Max/Min to Clip, BatchNorm into Conv,
    optional Conv / Gemm biases), plus cheap merges and no-op removals (Reshape, Transpose, Cast,
    Expand). Why not ``optimize=True``: matching all its rules against every node of the traced
    graph (~4000 for the demo) took 12.3 s of the demo export, against 1.5 s for folding alone
    (2-core AMD EPYC). The demo exports to 1344 nodes this way (1329 with all rules); ONNX
    Runtime, which fuses graphs itself when it loads them, gives the same outputs (within 1.2e-7)
    at the same speed (91.6 / 93.4 and 98.7 / 96.4 ms per 320x320 image, all rules / these).
    """
    import onnx_ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter import RewritePass
    from onnxscript.rewriter.rules import common as rules

    rewrites = RewritePass(
        [
            rules.materialize_reshape_shape_rule,
            rules.reshape_reshape_rule,
            rules.unsqueeze_unsqueeze_rule,
            rules.transpose_transpose_rule,
            rules.no_op_transpose_rule,
            rules.no_op_expand_rule,
            rules.no_op_cast_rule,
            rules.cast_cast_rule,
            rules.max_min_rule,
            rules.min_max_rule,
            rules.fuse_batchnorm_into_conv_rule,
            rules.remove_optional_bias_from_conv_rule,
            rules.remove_optional_bias_from_gemm_rule,
        ]
    )
    common.InlinePass()(model)
    for _ in range(iterations):
        fold_constants(model)
        for cleanup in (
            rewrites,
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            cleanup(model)
    onnx_ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


INPUT_CONTRACT = (
    "image: float32 (N, 3, H, W), pixels 0..255 in rankdetr.image_format, resized by "
    "rankdetr.test_augmentation, unpadded; outputs boxes (N, D, 4) XYXY input pixels, scores "
    "(N, D) descending, labels (N, D) int64 indices into rankdetr.class_names"
)


def write_metadata(path: str | Path, entries: dict[str, str]) -> None:
    """Add (or replace) `rankdetr.<key>` entries of the file's `metadata_props`."""
    import onnx

    model = onnx.load(str(path))
    keep = {p.key: p.value for p in model.metadata_props}
    keep.update({METADATA_PREFIX + k: str(v) for k, v in entries.items()})
    onnx.helper.set_model_props(model, keep)
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's `rankdetr.*` metadata entries, without the prefix."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def _plain(node):
    """A config node as JSON data: `_target_` callables as their dotted names."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if callable(node):
        return f"{node.__module__}.{node.__qualname__}"
    return node


def config_metadata(cfg, config_file: str | None = None) -> dict[str, str]:
    """The metadata a predictor needs besides the graph: the test augmentations (JSON, as the
    config's nodes), the image format, the class names (JSON list; left out with a warning
    when the config's datasets are not registered here) and the config file name."""
    import warnings

    from omegaconf import OmegaConf

    from rankdetr.errors import is_user_error
    from rankdetr.predictor import _class_names

    mapper = cfg.dataloader.test.mapper
    augmentation = OmegaConf.to_container(mapper.augmentation, resolve=True)
    entries = {
        "test_augmentation": json.dumps(_plain(augmentation)),
        "image_format": str(mapper.get("img_format", "RGB")),
    }
    try:
        entries["class_names"] = json.dumps(list(_class_names(cfg)))
    except Exception as error:  # an unregistered dataset: the graph is still usable
        if not is_user_error(error):
            raise
        warnings.warn(f"no class names in the ONNX metadata: {error}", stacklevel=2)
    if config_file:
        entries["config"] = str(config_file)
    return entries


def fixed_input_shape(path: str | Path) -> tuple[int, ...] | None:
    """(N, 3, H, W) of a file exported with a fixed input shape, None where any dimension of
    its `image` input is dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    (image,) = [i for i in graph.input if i.name == INPUT_NAMES[0]]
    dims = image.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def custom_domain_ops(path: str | Path) -> list[str]:
    """`domain::op` of every node outside the standard ONNX domain (empty for a clean graph)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted(
        {f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")}
    )


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on `path` (graph optimisations on, ORT's default)."""
    require_onnx_packages("onnxruntime")
    import onnxruntime as ort

    if not Path(path).is_file():  # else ONNX Runtime's NO_SUCHFILE traceback
        raise FileNotFoundError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_with_order_outputs(path: str | Path, threads: int | None = None):
    """(session, names): an ONNX Runtime session on the graph of `path` that also returns the
    indices of every TopK node (the proposal selection, the decoders' query sorts, the final
    top-k), in graph order, named by `names`; the file itself is unchanged."""
    require_onnx_packages("onnx", "onnxruntime")
    import onnx
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    model = onnx.load(str(path))
    names = [node.output[1] for node in model.graph.node if node.op_type == "TopK"]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, names


def is_equally_good_order(scores: torch.Tensor, order: torch.Tensor, tolerance: float) -> bool:
    """Whether `order` is, within `tolerance`, a valid result of a descending top-k / sort of
    `scores`: distinct indices, non-increasing scores along the order, and no unchosen score
    above the last chosen one, each up to `tolerance` (exact where a score is not finite).

    Args:
        scores: (N, S) scores; order: (N, k) int64 indices into S, k <= S.
    """
    n, s = scores.shape
    if order.dim() != 2 or order.shape[0] != n or order.shape[1] > s:
        return False
    if order.min() < 0 or order.max() >= s:
        return False
    chosen_mask = torch.zeros(n, s, dtype=torch.bool).scatter_(1, order, True)
    if (chosen_mask.sum(1) != order.shape[1]).any():  # an index chosen twice
        return False
    scores = scores.double()
    chosen = scores.gather(1, order)

    def not_above(higher: torch.Tensor, lower: torch.Tensor) -> bool:
        # lower <= higher + tolerance; inf - inf would be NaN: compare those exactly
        return bool(((lower <= higher) | (lower - higher <= tolerance)).all())

    if not not_above(chosen[:, :-1], chosen[:, 1:]):
        return False
    if order.shape[1] == s:
        return True
    rest = scores.masked_fill(chosen_mask, -torch.inf).max(1).values
    return not_above(chosen.min(1).values, rest)


@dataclass
class OrderReplay:
    """Counts of a :func:`replaying_orders` run: `replayed` sorts whose order came from the
    other runtime and differs from PyTorch's own (ties within the tolerance), `refused` sorts
    whose other order is not an equally good one (PyTorch's own is kept)."""

    replayed: int = 0
    refused: int = 0
    calls: int = 0


@contextlib.contextmanager
def replaying_orders(
    orders: list, tolerance: float = TOLERANCES["scores"]
) -> Iterator[OrderReplay]:
    """Within: the model's discontinuous steps (the two-stage top-k of proposals, the decoders'
    query sorts) take the orders of `orders` (numpy or torch (N, k) int64 arrays, the other
    runtime's TopK indices in graph order), one per call, wherever that order is an equally
    good one for PyTorch's own scores (:func:`is_equally_good_order`); else PyTorch's own.

    Why: where two scores are closer than the runtimes' rounding (common with untrained
    weights, and among a trained model's background queries), ONNX Runtime and PyTorch may
    break the tie differently. A swapped proposal or rank changes the queries' rank embeddings
    and every later detection, so a comparison would measure the tie, not the graph. Replaying
    the other order makes both follow the same branch; scores, boxes and labels are then
    compared as usual, and an order that is not a tie is never taken.
    """
    from rankdetr.modeling import decoder, dino_decoder

    replay = OrderReplay()
    queue = [torch.as_tensor(o) for o in orders]

    def replaying(original):
        def ordered(scores: torch.Tensor, *args):
            own = original(scores, *args)
            replay.calls += 1
            if not queue or queue[0].shape != own.shape:
                replay.refused += 1
                return own
            other = queue.pop(0).to(own.device)
            if torch.equal(other, own):
                return own
            if not is_equally_good_order(scores.detach().cpu(), other.cpu(), tolerance):
                replay.refused += 1
                return own
            replay.replayed += 1
            return other

        return ordered

    patches = [
        (two_stage, "top_proposal_indices"),
        (dino, "top_proposal_indices"),
        (decoder, "descending_order"),
        (dino_decoder, "descending_order"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
    try:
        for owner, name, original in saved:
            setattr(owner, name, replaying(original))
        yield replay
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def pytorch_detections(
    model: nn.Module, images: torch.Tensor, orders=None, tolerance: float = TOLERANCES["scores"]
):
    """The model's own inference (detectron2 inputs, compiled op where built) on (N, 3, H, W)
    images: boxes (N, D, 4), scores (N, D), labels (N, D), as numpy arrays; with `orders`
    (another runtime's TopK indices), the pair (those arrays, the :class:`OrderReplay` of
    :func:`replaying_orders` with `tolerance`)."""
    import numpy as np

    replay = contextlib.nullcontext() if orders is None else replaying_orders(orders, tolerance)
    with torch.no_grad(), replay as counts:
        results = model.eval()([{"image": image} for image in images])
    instances = [r["instances"] for r in results]
    detections = (
        np.stack([i.pred_boxes.tensor.cpu().numpy() for i in instances]),
        np.stack([i.scores.cpu().numpy() for i in instances]),
        np.stack([i.pred_classes.cpu().numpy() for i in instances]),
    )
    return detections if orders is None else (detections, counts)


def compare_detections(expected, actual, score_tolerance: float = TOLERANCES["scores"]) -> dict:
    """Largest differences between two (boxes, scores, labels) triples of one batch.

    Labels (and boxes) are compared only where the expected score is more than
    `score_tolerance` away from both neighbours: closer detections may swap places.
    """
    import numpy as np

    boxes, scores, labels = expected
    other_boxes, other_scores, other_labels = actual
    gaps = np.abs(np.diff(scores, axis=1))  # (N, D - 1)
    inf = np.full(scores.shape[:1] + (1,), np.inf)
    separated = np.minimum(np.concatenate([inf, gaps], 1), np.concatenate([gaps, inf], 1))
    separated = separated > score_tolerance
    box_error = np.abs(boxes - other_boxes).max(-1)
    return {
        "scores": float(np.abs(scores - other_scores).max()),
        "boxes": float(box_error[separated].max(initial=0.0)),
        "label_mismatches": int((labels != other_labels)[separated].sum()),
        "compared": int(separated.sum()),
        "detections": int(scores.size),
    }


def check_onnx(
    model: nn.Module,
    path: str | Path,
    sizes=None,
    batch_sizes=None,
    seed: int = 0,
    threads: int | None = None,
) -> list[dict]:
    """Run `path` in ONNX Runtime beside the PyTorch model on random images of each (H, W) of
    `sizes` (with the batch sizes of `batch_sizes`; default :data:`CHECK_SIZES` at batches 1, 1
    and 2, or a fixed-shape file's own shape); one row of largest differences per size,
    with "ok" (within :data:`TOLERANCES`, labels equal where separated), "ties" (sorts where
    PyTorch followed ONNX Runtime's order of tied scores) and "refused" (sorts where ONNX
    Runtime's order was not a tie of PyTorch's scores; such a row usually fails).

    PyTorch replays ONNX Runtime's tie-breaking (:func:`replaying_orders`): untrained weights
    give near-equal scores everywhere (e.g. the Rank-DETR R50 config's initial weights at
    320x320: two queries 1e-6 apart swap ranks, and PyTorch's own float32 then differs from its
    float64 by 2e-3 in score, as much as ONNX Runtime does).
    """
    sizes, batch_sizes = _check_shapes(path, sizes, batch_sizes)
    session, order_names = session_with_order_outputs(path, threads)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for (h, w), n in zip(sizes, batch_sizes):
        images = torch.rand(n, 3, h, w, generator=generator) * 255
        outputs = session.run(OUTPUT_NAMES + order_names, {"image": images.numpy()})
        actual, orders = outputs[:3], outputs[3:]
        expected, replay = pytorch_detections(model, images, orders=orders)
        row = {"size": f"{h}x{w}", "batch": n, **compare_detections(expected, actual)}
        row["ok"] = (
            row["scores"] <= TOLERANCES["scores"]
            and row["boxes"] <= TOLERANCES["boxes"]
            and row["label_mismatches"] == 0
        )
        row["ties"], row["refused"] = replay.replayed, replay.refused
        rows.append(row)
    return rows


def _check_shapes(path, sizes, batch_sizes) -> tuple[list, list]:
    """(sizes, batch sizes) for :func:`check_onnx`: the defaults, or a fixed-shape file's own
    shape; a fixed-shape file asked about another shape is an InputShapeError naming both."""
    fixed = fixed_input_shape(path)
    if fixed is None:
        return list(sizes or CHECK_SIZES), list(batch_sizes or (1, 1, 2))
    n, _, h, w = fixed
    sizes = list(sizes or [(h, w)])
    batch_sizes = list(batch_sizes or [n] * len(sizes))
    wrong = [(b, *s) for s, b in zip(sizes, batch_sizes) if (b, *s) != (n, h, w)]
    if wrong:
        raise InputShapeError(
            f"{path} takes only (N, H, W) = {(n, h, w)} (a fixed-shape export); "
            f"asked to check {wrong}"
        )
    return sizes, batch_sizes
