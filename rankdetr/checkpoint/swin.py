"""Swin weights in the two layouts users have, for :class:`rankdetr.modeling.swin.SwinBackbone`.

* **detectron2 / the release**: upstream detectron2's `SwinTransformer` (the release's
  `backbone.*`), with the output norms `norm1..3` and persistent `relative_position_index`
  buffers.
* **Microsoft's ImageNet files** (`swin_tiny_patch4_window7_224.pth`,
  `swin_large_patch4_window7_224_22k.pth`, which the release's configs name as
  `init_checkpoint`): the same block names, plus the classifier's final `norm` and `head`, and
  `attn_mask` buffers; no output norms (these keep their initialisation, as in the release).

Both convert strictly: the index buffers are checked against the window size they imply and
dropped (the module computes them), and any tensor that has no place is named.
"""

from __future__ import annotations

import re

import torch

__all__ = ["convert_swin_state_dict", "is_swin_classification_checkpoint", "swin_sizes"]

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_INDEX_BUFFER = re.compile(r"\.attn\.relative_position_index$")
_MASK_BUFFER = re.compile(r"(^|\.)attn_mask$")
_OURS = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))"
    r"|norm\d+\.(weight|bias))$"
)


def is_swin_classification_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` is a Microsoft (or timm-converted-back) ImageNet Swin state dict: Swin
    block names at the top level, with the classifier's `head`."""
    return "patch_embed.proj.weight" in state and any(k.startswith("head.") for k in state)


def swin_sizes(state: dict[str, torch.Tensor]) -> dict:
    """embed_dim, depths, num_heads and window_size of a Swin state dict (our or detectron2's
    names, without a prefix), read from the tensors."""
    if "patch_embed.proj.weight" not in state:
        raise KeyError("not a Swin state dict: no patch_embed.proj.weight")
    blocks: dict[int, int] = {}
    for name in state:
        match = _BLOCK.match(name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    depths = tuple(blocks[i] for i in range(len(blocks)))
    heads, windows = [], set()
    for stage in range(len(depths)):
        table = state[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        windows.add((int(round(table.shape[0] ** 0.5)) + 1) // 2)
    if len(windows) != 1:
        raise ValueError(f"Swin stages disagree on the window size: {sorted(windows)}")
    return {
        "embed_dim": int(state["patch_embed.proj.weight"].shape[0]),
        "depths": depths,
        "num_heads": tuple(heads),
        "window_size": windows.pop(),
    }


def convert_swin_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detectron2's or Microsoft's Swin names (no prefix) -> :class:`SwinBackbone`'s.

    Drops the classifier (`head.*`, the final `norm.*`), `attn_mask` buffers and the
    `relative_position_index` buffers after checking each against its window size.

    Raises:
        ValueError: an index buffer that is not the standard one.
        KeyError: tensors with no place in the backbone, all named.
    """
    from rankdetr.modeling.swin import relative_position_index

    classifier = is_swin_classification_checkpoint(state)
    converted, unknown = {}, []
    for name, tensor in state.items():
        if _MASK_BUFFER.search(name) or (classifier and re.match(r"^(head|norm)\.", name)):
            continue
        if _INDEX_BUFFER.search(name):
            window = int(round(tensor.shape[0] ** 0.5))
            if not torch.equal(tensor.long(), relative_position_index(window)):
                raise ValueError(f"{name} is not the relative position index of a window {window}")
            continue
        if _OURS.match(name):
            converted[name] = tensor
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise KeyError(f"tensors with no place in the Swin backbone: {shown}{more}")
    return converted
