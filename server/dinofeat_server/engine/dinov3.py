"""DINOv3 vision transformers (ViT-S/16, S+/16, B/16, L/16, H+/16, 7B/16): a small module with the official
parameter names (facebookresearch/dinov3 `DinoVisionTransformer`), so the official checkpoints load as they are.

What differs from DINOv2 (`backbone.py`): patch 16; no position-embedding table but rotary position embeddings
(RoPE) on the queries and keys of the patch tokens, at positions normalised per image to [-1, 1] along each axis
("separate"); 4 storage tokens after the CLS token; LayerNorm eps 1e-5; no key bias (the checkpoints' `bias_mask`
zeroes it); SwiGLU feed-forward for S+, H+ and 7B. Arxiv 2508.10104.

Tiles: a tile's tokens get the RoPE positions they have in the whole image's token grid (`PosWindow`), as DINOv2
tiles get the whole image's position embeddings; so tiles agree with the untiled image except for attention
to tokens outside the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD, Block, PatchEmbed, PosRule, PosWindow, VitOutput, encoded

LAYER_NORM_EPS = 1e-5
ROPE_BASE = 100.0
STORAGE_TOKENS = 4
SATELLITE_MEAN = (0.430, 0.411, 0.296)
SATELLITE_STD = (0.213, 0.156, 0.143)
"""The SAT-493M weights' input normalisation (the official README), instead of ImageNet's."""


@dataclass(frozen=True)
class Dinov3Config:
    """What distinguishes the DINOv3 ViTs: width, depth, heads, feed-forward kind and width; and which images
    the weights were trained on (`satellite`: SAT-493M, with its own mean and std)."""

    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    swiglu: bool = False
    satellite: bool = False
    patch: int = 16
    registers: int = STORAGE_TOKENS
    """Storage tokens (named as DINOv2's registers, which they are, for the shared estimates of `backbone.py`)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input normalisation the weights expect."""
        return (SATELLITE_MEAN, SATELLITE_STD) if self.satellite else (IMAGENET_MEAN, IMAGENET_STD)

    @property
    def gpu_only(self) -> bool:
        """The 7B model: 27 GB of float32 weights, weeks of CPU time per image."""
        return self.dim >= 4096


DINOV3_CONFIGS: dict[str, Dinov3Config] = {
    "dinov3_vits16": Dinov3Config(dim=384, depth=12, heads=6, mlp_hidden=1536),
    "dinov3_vits16plus": Dinov3Config(dim=384, depth=12, heads=6, mlp_hidden=1536, swiglu=True),
    "dinov3_vitb16": Dinov3Config(dim=768, depth=12, heads=12, mlp_hidden=3072),
    "dinov3_vitl16": Dinov3Config(dim=1024, depth=24, heads=16, mlp_hidden=4096),
    "dinov3_vith16plus": Dinov3Config(dim=1280, depth=32, heads=20, mlp_hidden=5120, swiglu=True),
    "dinov3_vit7b16": Dinov3Config(dim=4096, depth=40, heads=32, mlp_hidden=8192, swiglu=True),
}
"""The official ViT backbones (hub names of facebookresearch/dinov3); SwiGLU widths are the official
int(dim * ratio * 2 / 3) rounded up to 8 (64 for 7B)."""
DINOV3_BACKBONES = tuple(DINOV3_CONFIGS)


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The official RoPE periods (`RopePositionEmbedding._init_weights` with `base`), for files that omit them."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def rope_coordinates(size: int, start: int, count: int) -> torch.Tensor:
    """Token centres of positions start .. start + count - 1 of a `size`-token axis, in [-1, 1] as the official
    "separate" normalisation: (i + 0.5) / size * 2 - 1."""
    return 2.0 * (torch.arange(0.5, size, dtype=torch.float32) / size)[start : start + count] - 1.0


class RopeEmbedding(nn.Module):
    """Axial rotary embeddings without learned weights: sin and cos (rows * cols, head_dim) of a token grid."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim), persistent=True)

    def forward(self, rows: int, cols: int, window: PosWindow | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos of a rows x cols grid, or of that grid as a window of the whole image's grid."""
        whole_rows, whole_cols, row0, col0 = (rows, cols, 0, 0) if window is None else (window.rows, window.cols, window.row0, window.col0)
        coords_h = rope_coordinates(whole_rows, row0, rows).to(self.periods.device)
        coords_w = rope_coordinates(whole_cols, col0, cols).to(self.periods.device)
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2)
        angles = (2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]).flatten(1, 2).tile(2)  # (HW, D)
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def with_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE on the patch tokens of x (B, heads, N, D) (the first N - HW tokens, CLS and storage, are left as
    they are), computed in float32 as the official code does and cast back."""
    prefix = x.shape[-2] - sin.shape[-2]
    patches = x[:, :, prefix:].float()
    rotated = patches * cos + rotate_half(patches) * sin
    return torch.cat([x[:, :, :prefix], rotated.to(x.dtype)], dim=-2)


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3: the official SwiGLUFFN (w1, w2, w3 kept apart)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Dinov3VisionTransformer(nn.Module):
    """DINOv3 ViT with the official parameter names and the forward of `backbone.DinoVisionTransformer`
    (settable patch-embedding stride, tiles, CLS attention), so the extractor and view ensembles use either."""

    def __init__(self, config: Dinov3Config):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.dim, config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, config.registers, config.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, config.dim))  # in the checkpoints; unused at inference
        self.rope_embed = RopeEmbedding(config.head_dim)
        self.blocks = nn.ModuleList(Block(config, SwiGLU, LAYER_NORM_EPS) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor, stride: int | None = None, cls_attention: bool = False,
                pos_window: PosWindow | None = None, pos_rule: PosRule = "official") -> VitOutput:
        """Tokens of normalised images (B, 3, H, W); stride defaults to the patch size. RoPE positions are those
        of the strided token grid (as the official forward with a strided patch embedding, HR-Dv2's DINOv3 path);
        with `pos_window` those of the window in the whole image's grid. `pos_rule` concerns DINOv2's position
        tables only: RoPE has one rule."""
        stride = stride or self.config.patch
        weight, bias = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        x = F.conv2d(images, weight.to(images.dtype), bias.to(images.dtype), stride=stride)
        b, d, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).expand(b, -1, -1).to(x.dtype)
        x = torch.cat([prefix, x], dim=1)
        sin, cos = self.rope_embed(rows, cols, pos_window)
        return encoded(self.blocks, self.norm, x, (rows, cols), 1 + self.config.registers, cls_attention,
                       partial(with_rope, sin=sin, cos=cos))
