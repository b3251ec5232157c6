"""DINOv2 vision transformer: a small, readable module, state-dict compatible with the official
checkpoints (dinov2_vit{s,b,l,g}14{,_reg4}_pretrain.pth), with a settable patch-embedding stride.

The architecture is read off a state dict (width, depth, registers, SwiGLU, position grid), so the
official models and small random-weight test models load through the same code. Heads are 64 wide,
as in every DINOv2 model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64
LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PosRule = Literal["official", "hr_dv2"]
"""How position embeddings are interpolated: DINOv2's own rule, or the paper's reference code's."""


@dataclass(frozen=True)
class VitConfig:
    """What distinguishes the DINOv2 models: width, depth, registers, feed-forward kind, patch, position grid."""

    dim: int
    depth: int
    mlp_hidden: int
    registers: int = 0
    swiglu: bool = False
    patch: int = 14
    pos_grid: int = 37

    @property
    def heads(self) -> int:
        return max(self.dim // HEAD_DIM, 1)


OFFICIAL_CONFIGS = {
    "s": VitConfig(dim=384, depth=12, mlp_hidden=1536),
    "b": VitConfig(dim=768, depth=12, mlp_hidden=3072),
    "l": VitConfig(dim=1024, depth=24, mlp_hidden=4096),
    "g": VitConfig(dim=1536, depth=40, mlp_hidden=4096, swiglu=True),
}


Positions = Callable[[torch.Tensor], torch.Tensor]
"""A rotation of queries or keys (B, heads, N, head dim) by their tokens' positions (DINOv3's RoPE)."""


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; SDPA unless the attention map is wanted."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False,
                positions: Positions | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of x (B, N, D); `positions` rotates queries and keys first (DINOv3's RoPE; DINOv2 adds its
        position table to the tokens instead)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if positions is not None:
            q, k = positions(q), positions(k)
        out = F.scaled_dot_product_attention(q, k, v)
        cls_attention = None
        if return_cls_attention:  # true softmax attention of the CLS query (after any rotation), per head: (B, heads, N)
            scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
            cls_attention = scores.softmax(dim=-1)[:, :, 0]
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), cls_attention


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """The giant model's feed-forward: silu(x W1) * (x W2), then W3 (W1 and W2 fused as w12)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """A pre-norm transformer block with LayerScale; the feed-forward is `swiglu` where the config says so
    (DINOv2's fused w12, or DINOv3's w1/w2/w3), else an MLP; layer norms with epsilon `eps` (DINOv3: 1e-5)."""

    def __init__(self, config: VitConfig, swiglu: type[nn.Module] | None = None, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=eps)
        self.attn = Attention(config.dim, config.heads)
        self.ls1 = LayerScale(config.dim)
        self.norm2 = nn.LayerNorm(config.dim, eps=eps)
        self.mlp = ((swiglu or SwiGLU) if config.swiglu else Mlp)(config.dim, config.mlp_hidden)
        self.ls2 = LayerScale(config.dim)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False,
                positions: Positions | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, cls_attention = self.attn(self.norm1(x), return_cls_attention, positions)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.norm2(x))), cls_attention


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


@dataclass(frozen=True)
class PosWindow:
    """A tile's place in the whole image's token grid (rows x cols), starting at token (row0, col0)."""

    rows: int
    cols: int
    row0: int
    col0: int
    square_image: bool


@dataclass
class VitOutput:
    """Normalised patch tokens (B, C, h0, w0), CLS token (B, C), optional CLS attention (B, heads, h0, w0)."""

    patch_tokens: torch.Tensor
    cls_token: torch.Tensor
    cls_attention: torch.Tensor | None


def forward_flops(config: VitConfig, tokens: int) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass over `tokens` patch tokens
    (plus CLS and registers): the blocks' projections, feed-forward and attention, and the patch embedding."""
    n = tokens + 1 + config.registers
    per_block = 2 * n * (4 * config.dim**2 + (3 if config.swiglu else 2) * config.dim * config.mlp_hidden) + 4 * n * n * config.dim
    return per_block * config.depth + 2 * tokens * 3 * config.patch**2 * config.dim


def token_grid(size: int, patch: int, stride: int) -> int:
    """Tokens along an axis of `size` pixels: 1 + (size - patch) // stride."""
    return 1 + (size - patch) // stride


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with the official parameter names; `stride` sets the patch-embedding stride."""

    def __init__(self, config: VitConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.dim, config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, config.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.registers, config.dim)) if config.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, config.dim))  # in the checkpoints; unused at inference
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)

    def interpolated_pos_embed(self, rows: int, cols: int, square_image: bool = True,
                               pos_rule: PosRule = "official") -> torch.Tensor:
        """Position embeddings for a rows x cols token grid, bicubic. The "official" rule is DINOv2's
        interpolate_pos_encoding: plain models by scale factor with the 0.1 offset and no antialias,
        register models by size with antialias. The "hr_dv2" rule is the paper's reference code
        (HR-Dv2 `patch.py`), which uses the plain models' rule for every model, registers included.
        The CLS embedding is unchanged; like both, a square image with the training grid (37 x 37)
        keeps the embeddings as they are."""
        m = self.config.pos_grid
        pos = self.pos_embed.float()
        if rows == m and cols == m and square_image:
            return pos
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.config.registers and pos_rule == "official":
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
        else:
            grid = F.interpolate(grid, scale_factor=((rows + 0.1) / m, (cols + 0.1) / m), mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (rows, cols)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, images: torch.Tensor, stride: int | None = None, cls_attention: bool = False,
                pos_window: PosWindow | None = None, pos_rule: PosRule = "official") -> VitOutput:
        """Tokens of ImageNet-normalised images (B, 3, H, W); stride defaults to the patch size.

        With `pos_window` the images are a tile of a larger image: their tokens get the position
        embeddings they have in the whole image, so tiles agree with the untiled result. `pos_rule`
        chooses how position embeddings are interpolated (see `interpolated_pos_embed`).
        """
        stride = stride or self.config.patch
        weight, bias = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        x = F.conv2d(images, weight.to(images.dtype), bias.to(images.dtype), stride=stride)
        b, d, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if pos_window is None:
            pos = self.interpolated_pos_embed(rows, cols, images.shape[-2] == images.shape[-1], pos_rule)
        else:
            whole = self.interpolated_pos_embed(pos_window.rows, pos_window.cols, pos_window.square_image, pos_rule)
            grid = whole[:, 1:].reshape(1, pos_window.rows, pos_window.cols, -1)
            grid = grid[:, pos_window.row0 : pos_window.row0 + rows, pos_window.col0 : pos_window.col0 + cols]
            pos = torch.cat([whole[:, :1], grid.reshape(1, rows * cols, -1)], dim=1)
        x = x + pos.to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return encoded(self.blocks, self.norm, x, (rows, cols), 1 + self.config.registers, cls_attention)


def encoded(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor, grid: tuple[int, int], first_patch: int,
            cls_attention: bool, positions: Positions | None = None) -> VitOutput:
    """The blocks and final norm over tokens x (B, N, D) whose patches, from `first_patch` on, form a `grid`
    (rows, cols): the patch tokens as (B, D, rows, cols), the CLS token and, asked for, the last block's CLS
    attention over the patches."""
    attention = None
    for i, block in enumerate(blocks):
        x, attention = block(x, cls_attention and i == len(blocks) - 1, positions)
    x = norm(x)
    b, d = x.shape[0], x.shape[-1]
    patches = x[:, first_patch:].transpose(1, 2).reshape(b, d, *grid)
    if attention is not None:
        attention = attention[:, :, first_patch:].reshape(b, -1, *grid)
    return VitOutput(patch_tokens=patches, cls_token=x[:, 0], cls_attention=attention)


def imagenet_normalised(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) intensities in [0, 1] -> ImageNet mean/std normalised, as DINOv2 was trained."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
