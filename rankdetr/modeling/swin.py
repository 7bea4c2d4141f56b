"""The Swin Transformer backbone as the original Rank-DETR release runs it.

The release's Swin configs use upstream detectron2's `SwinTransformer` (the mmdetection variant of
Microsoft's model), so its published Swin checkpoints hold that module's weights. This is a compact
module of our own that computes the same maps, with the same parameter names:

* patches of 4x4 pixels (the image padded right / bottom to whole patches), a linear embedding and
  a LayerNorm;
* stages of window-attention blocks (pre-norm, relative position bias, every second block shifted
  by half a window, GELU MLP), the map padded right / bottom to whole windows *after* the block's
  first LayerNorm, so the padding tokens are zeros that take part in attention as keys; shifted
  windows that wrap around are masked with -100 (not -inf), and the shift is applied even when a
  map is smaller than one window;
* a 2x2 patch merging (LayerNorm then a bias-free linear layer) at the end of every stage but the
  last, padding odd sizes with zeros;
* one LayerNorm per returned stage (`norm1`, `norm2`, `norm3`), applied before the merging.

timm's Swin is not used: its features have no output norms, it merges patches at the start of a
stage (other names, other order), and it pads maps and builds the shift masks differently, so it
cannot reproduce these maps on images that need padding (see tests/modeling/test_swin.py, which
compares with detectron2's module itself on three image sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from rankdetr.layers.attention_backend import working_attention_kernel

__all__ = ["SwinBackbone", "SWIN_T", "SWIN_L"]

# The release's sizes (its rank_detr_swin_{tiny,large}_two_stage configs).
SWIN_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
SWIN_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
_SHIFT_MASK_VALUE = -100.0  # what the release's module adds between wrapped-around regions


class PatchEmbed(nn.Module):
    """(N, 3, H, W) -> (N, C, ceil(H / p), ceil(W / p)): padded to whole patches, a p x p conv
    with stride p, then a LayerNorm over channels."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        images = F.pad(images, (0, -w % self.patch_size, 0, -h % self.patch_size))
        x = self.proj(images)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64: for tokens i, j of a window, the row of the (2w-1)^2 bias table that holds
    their offset (dy, dx), numbered (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """windows (B*nW, T, C) with T = window^2; mask (nW, T, T) additive or None."""
        b, t, c = windows.shape
        q, k, v = self.qkv(windows).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        bias = bias.view(t, t, self.num_heads).permute(2, 0, 1)  # (heads, T, T)
        if mask is not None:
            num_windows = mask.shape[0]
            bias = (bias[None] + mask[:, None]).repeat(b // num_windows, 1, 1, 1)
        with working_attention_kernel(q):
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(attended.transpose(1, 2).reshape(b, t, c))


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nW, window^2, C), row-major windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * nW, window^2, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shift_mask(h: int, w: int, window: int, shift: int, device, dtype) -> torch.Tensor:
    """(nW, T, T) additive mask of the shifted windows of an h x w (padded) map: after rolling by
    -shift, tokens that come from different regions of the unrolled map must not attend to each
    other (regions split at h - window and h - shift, likewise in w)."""

    def regions(size: int) -> torch.Tensor:
        index = torch.zeros(size, dtype=torch.long, device=device)
        index[max(size - window, 0) :] = 1
        index[max(size - shift, 0) :] = 2
        return index

    labels = (regions(h)[:, None] * 3 + regions(w)[None, :])[None, :, :, None]
    labels = to_windows(labels, window).squeeze(-1)  # (nW, T)
    differs = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill(
        differs, _SHIFT_MASK_VALUE
    )


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each with a residual and drop path."""

    def __init__(self, dim, num_heads, window, shift, mlp_ratio, drop_path):
        super().__init__()
        self.window, self.shift, self.drop_path = window, shift, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, W, C); mask: the stage's shift mask (used by shifted blocks)."""
        b, h, w, c = x.shape
        y = F.pad(self.norm1(x), (0, 0, 0, -w % self.window, 0, -h % self.window))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn(to_windows(y, self.window), mask if self.shift else None),
                         self.window, hp, wp)  # fmt: skip
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self._drop(y[:, :h, :w])
        return x + self._drop(self.mlp(self.norm2(x)))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.drop_path, "row", self.training)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): each 2x2 neighbourhood (odd sizes padded with
    zeros) concatenated as (top-left, bottom-left, top-right, bottom-right), LayerNorm, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window, mlp_ratio, drop_paths, downsample):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, p)
            for i, p in enumerate(drop_paths)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (the stage's output (B, H, W, C), the next stage's input)."""
        h, w = x.shape[1:3]
        hp, wp = h + (-h % self.window), w + (-w % self.window)
        mask = shift_mask(hp, wp, self.window, self.shift, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinBackbone(nn.Module):
    """Swin Transformer features of stages `out_indices` (strides 8, 16, 32 for (1, 2, 3)), each
    through its own LayerNorm, as (N, C_i, H_i, W_i) maps, finest first.

    Parameter names are those of detectron2's `SwinTransformer` (the release's `backbone.*`),
    so its checkpoints load through :func:`rankdetr.checkpoint.convert_swin_state_dict`.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        out_indices: tuple[int, ...] = (1, 2, 3),
    ):
        """
        Args:
            embed_dim: channels of stage 0; stage i has embed_dim * 2^i.
            depths, num_heads: blocks and attention heads per stage.
            window_size: attention window (7 for the 224-px ImageNet weights the release uses).
            patch_size: pixels per patch side.
            mlp_ratio: MLP hidden size / channels.
            drop_path_rate: stochastic depth of the last block; it grows linearly from 0.
            out_indices: stages returned (each gets an output LayerNorm `norm{i}`).
        """
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # On the CPU also when the model is built on another device (the meta device, say).
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:i])
            self.layers.append(
                SwinStage(embed_dim * 2**i, depth, heads, window_size, mlp_ratio,
                          rates[first : first + depth], downsample=i < len(depths) - 1)
            )  # fmt: skip
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
        self.out_channels = [embed_dim * 2**i for i in self.out_indices]
        self.strides = [patch_size * 2**i for i in self.out_indices]
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> [(N, C_i, ceil(H / s_i), ceil(W / s_i)) for the returned stages]."""
        x = self.patch_embed(images).permute(0, 2, 3, 1)  # (N, h, w, C)
        outputs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            if i in self.out_indices:
                outputs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
        return outputs


def _init_weights(module: nn.Module) -> None:
    """The release's initialisation: truncated normal (std 0.02) linear weights, zero biases,
    unit LayerNorms; the patch convolution keeps PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
