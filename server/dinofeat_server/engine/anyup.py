"""AnyUp: a learned feature upsampler trained once for any backbone, ported from the official code.

AnyUp (Wimmer, Truong, Rakotosaona, Oechsle, Tombari, Schiele, Lenssen, "AnyUp: Universal Feature Upsampling",
ICLR 2026, arXiv:2510.12764; code github.com/wimmerth/anyup at 351807a, licensed CC-BY-4.0) upsamples features of
any encoder, any channel count, to the resolution of the image guiding it: every pixel is a query of a windowed
cross-attention whose keys come from the low-resolution features and the image, and whose averaged attention
weights mix the features themselves (the values). This module is a port of its `AnyUp` (`anyup/model.py` and
`anyup/layers`, the paper's non-NATTEN attention): the same modules and parameter names, so the official
checkpoint files load as they are, and the same numbers (tests/test_anyup.py: rel L2 <= 1e-5 against the
official module). Changed, without changing a number: the attention runs over blocks of pixels whose windows
(nearly) coincide, each over the keys its windows reach (the official builds a (pixels x tokens) mask for the
whole image and attends to every token); the feature-unification layer runs over row chunks. Memory then grows
with the image's pixels times 128 channels (the encoders), not with pixels times tokens (`peak_bytes`): 1.06 GB
peak RSS for 384 channels from 32x32 to 448x448, where the official took 8.7 GB.

The weights are the authors' release files (`ANYUP_CHECKPOINTS`), downloaded once into the weights cache and
checked by sha256, or a local file (`serve --weights anyup=PATH`, `--upsampler-weights PATH`, $DINOFEAT_ANYUP_WEIGHTS).

Shapes: image (B, 3, H, W) normalised as the backbone's input; features (B, C, h, w); output (B, C, H, W).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dinofeat.contract.errors import DinofeatError
from torch import nn

from .upsample import TokenPlacement

ANYUP_CHECKPOINTS = {
    "anyup_multi_backbone.pth": ("https://github.com/wimmerth/anyup/releases/download/checkpoint_v2/anyup_multi_backbone.pth",
                                 "b6cc407da8986c7e5c9098e61f7531767a9aca8fff20a1bc6c99d488e61aac59"),
    "anyup_paper.pth": ("https://github.com/wimmerth/anyup/releases/download/checkpoint/anyup_paper.pth",
                        "9d035c0f27114a6f32bdd3d8ed93b6cd39dad4b8f8bf94e69fddbfbf022901b2"),
}
"""The authors' release files: (address, sha256). multi_backbone (trained on DINOv2, DINOv2-R, CLIP, SigLIP and ViT
features) is the default, as it carries best to backbones it has not seen; paper is the DINOv2 ViT-S/14 model of
the paper's tables."""
DEFAULT_CHECKPOINT = "anyup_multi_backbone.pth"
WEIGHTS_VARIABLE = "DINOFEAT_ANYUP_WEIGHTS"
ATTENTION_BYTES = 64 << 20
"""Memory one chunk of attention scores may take (the scores of every head, before and after the softmax)."""


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, conv, twice), as `anyup/layers/convolutions.py`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, num_groups: int = 8, pad_mode: str = "reflect"):
        super().__init__()
        padding = kernel_size // 2
        self.block = nn.Sequential(
            nn.GroupNorm(num_groups, in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, padding_mode=pad_mode, bias=False),
            nn.GroupNorm(num_groups, out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding, padding_mode=pad_mode, bias=False),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class LearnedFeatureUnification(nn.Module):
    """Any channel count to `out_channels`: each channel convolved with a learned basis, a softmax over the basis,
    the mean over channels (`anyup/layers/feature_unification.py`), computed in row chunks of bounded memory."""

    def __init__(self, out_channels: int, kernel_size: int = 5):
        super().__init__()
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.basis = nn.Parameter(torch.randn(out_channels, 1, kernel_size, kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        k, p = self.kernel_size, self.kernel_size // 2
        padded = F.pad(features, (p, p, p, p), value=0)
        weight = self.basis.repeat(c, 1, 1, 1)
        # the official divides by how many of the kernel's taps fall inside the grid (zero padding)
        taps = F.conv2d(F.pad(features.new_ones(1, 1, h, w), (p, p, p, p)), features.new_ones(1, 1, k, k))
        rows = max(1, ATTENTION_BYTES // (3 * 4 * b * self.out_channels * c * w))
        out = features.new_empty(b, self.out_channels, h, w)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            x = F.conv2d(padded[:, :, y0 : y1 + 2 * p], weight, groups=c) / taps[:, :, y0:y1]
            # the official's view: conv channel g * out + o read as (out, c), kept for its weights' sake
            out[:, :, y0:y1] = F.softmax(x.view(b, self.out_channels, c, y1 - y0, w), dim=1).mean(dim=2)
        return out


class RoPE(nn.Module):
    """Rotary position encoding of 2-D coordinates in [0, 1] (`anyup/layers/positional_encoding.py`)."""

    def __init__(self, dim: int, theta: int = 100):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.freqs = nn.Parameter(torch.empty(2, dim))
        freqs_1d = theta ** torch.linspace(0, -1, dim // 4)
        freqs_1d = torch.cat([freqs_1d, freqs_1d])
        freqs_2d = torch.zeros(2, dim)
        freqs_2d[0, : dim // 2] = freqs_1d
        freqs_2d[1, -dim // 2 :] = freqs_1d
        self.freqs.data.copy_(freqs_2d * 2 * torch.pi)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        angle = coords @ self.freqs
        x1, x2 = x.chunk(2, dim=-1)
        return x * angle.cos() + torch.cat((-x2, x1), dim=-1) * angle.sin()


def window_bounds(pixels: int, tokens: int, ratio: float, device: torch.device, reach: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, end) token of each pixel's attention window along one axis: the tokens within `ratio` of the image's
    extent around the pixel centre (`anyup/layers/attention/attention_masking.py`, window2d, same float32 steps),
    or within `reach` tokens of it (a tile's windows: the whole image's, clipped to the tile)."""
    centre = (torch.arange(pixels, device=device, dtype=torch.float32) + 0.5) / pixels
    if reach is not None:
        return (centre * tokens - reach).clamp(0, tokens).floor().long(), (centre * tokens + reach).clamp(0, tokens).ceil().long()
    first = ((centre - ratio).clamp(0.0, 1.0) * tokens).floor().long()
    end = ((centre + ratio).clamp(0.0, 1.0) * tokens).ceil().long()
    return first, end


class CrossAttention(nn.Module):
    """Windowed multi-head cross-attention whose head-averaged weights mix the values (`chunked_attention.py`):
    the official's nn.MultiheadAttention keeps its parameters (and checkpoint keys); its output is never used."""

    def __init__(self, qk_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(qk_dim)
        self.norm_k = nn.RMSNorm(qk_dim)
        self.attention = nn.MultiheadAttention(embed_dim=qk_dim, num_heads=num_heads, dropout=0.0, batch_first=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_size: tuple[int, int],
                key_size: tuple[int, int], window_ratio: float, q_chunk_size: int | None = None,
                reach: tuple[float, float] | None = None) -> torch.Tensor:
        """query (B, H*W, D), key (B, h*w, D), value (B, h*w, C) -> (B, H*W, C), in blocks of pixels whose windows
        (nearly) coincide, each attending to the keys its windows reach: outside a pixel's window a key's weight is
        exactly zero, as in the official. The blocks of a band of rows go as one batched product of at most
        `q_chunk_size` queries (default: as many as ATTENTION_BYTES allows). `reach`: the windows' half-widths in
        tokens (rows, columns) instead of `window_ratio` of the grid."""
        heads, dim = self.attention.num_heads, query.shape[-1]
        (height, width), (h, w) = out_size, key_size
        w_q, w_k, _ = self.attention.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.attention.in_proj_bias.chunk(3)
        batch = query.shape[0]
        q = (F.linear(self.norm_q(query), w_q, b_q) * (dim // heads) ** -0.5).view(batch, height, width, heads, dim // heads)
        k = F.linear(self.norm_k(key), w_k, b_k).view(batch, h, w, heads, dim // heads)
        v = value.view(batch, h, w, -1)
        ratio = window_ratio if window_ratio > 0 else 1.0  # no window: every key
        row_first, row_end = window_bounds(height, h, ratio, q.device, reach[0] if reach else None)
        col_first, col_end = window_bounds(width, w, ratio, q.device, reach[1] if reach else None)
        # column blocks, padded to one shape so that a row block's column blocks make one batched product
        columns = window_spans(col_first, col_end)
        starts, widths, lefts, key_widths = (torch.tensor(c, device=q.device) for c in zip(*[(x0, x1 - x0, l, r - l) for x0, x1, l, r in columns]))
        wide, keys_wide = int(widths.max()), int(key_widths.max())
        query_columns = (starts[:, None] + torch.arange(wide, device=q.device)).clamp(max=width - 1)  # (n, wide)
        key_columns = (lefts[:, None] + torch.arange(keys_wide, device=q.device)).clamp(max=w - 1)  # (n, keys_wide)
        col_ok = ((key_columns[:, None, :] >= col_first[query_columns][:, :, None]) & (key_columns[:, None, :] < col_end[query_columns][:, :, None])
                  & (torch.arange(keys_wide, device=q.device) < key_widths[:, None])[:, None, :])  # (n, wide, keys_wide)
        real = (torch.arange(wide, device=q.device) < widths[:, None]).flatten()  # the padding's queries are dropped
        n, d = len(columns), dim // heads
        out = value.new_empty(batch, height, width, value.shape[-1])
        for top_pixel, bottom_pixel, top, bottom in window_spans(row_first, row_end):
            tall = bottom - top
            rows = ATTENTION_BYTES // (3 * 4 * batch * heads * n * wide * tall * keys_wide)  # pixel rows per product
            rows = max(1, min(rows, q_chunk_size // width) if q_chunk_size else rows)
            keys = k[:, top:bottom][:, :, key_columns].permute(0, 2, 4, 1, 3, 5).reshape(batch, n, heads, tall * keys_wide, d)
            values = v[:, top:bottom][:, :, key_columns].permute(0, 2, 1, 3, 4).reshape(batch, n, tall * keys_wide, -1)
            for y0 in range(top_pixel, bottom_pixel, rows):
                ys = slice(y0, min(y0 + rows, bottom_pixel))
                count = ys.stop - ys.start
                tokens = torch.arange(top, bottom, device=q.device)
                row_ok = (tokens >= row_first[ys, None]) & (tokens < row_end[ys, None])  # (count, tall)
                allowed = (row_ok[None, :, None, :, None] & col_ok[:, None, :, None, :]).reshape(1, n, 1, count * wide, tall * keys_wide)
                queries = q[:, ys][:, :, query_columns].permute(0, 2, 4, 1, 3, 5).reshape(batch, n, heads, count * wide, d)
                scores = (queries @ keys.transpose(-2, -1)).masked_fill_(~allowed, float("-inf"))
                weights = scores.softmax(dim=-1).mean(dim=2)  # (B, n, queries, keys): averaged over heads
                mixed = (weights @ values).view(batch, n, count, wide, -1).permute(0, 2, 1, 3, 4).reshape(batch, count, n * wide, -1)
                out[:, ys] = mixed[:, :, real]
        return out.view(batch, height * width, -1)


def window_spans(first: torch.Tensor, end: torch.Tensor, least: int = 24) -> list[tuple[int, int, int, int]]:
    """(first pixel, end pixel, first token, end token) of blocks along one axis: runs of pixels with the same
    window, neighbouring runs merged until a block spans `least` pixels (fewer, larger matrix products), each
    with the tokens its pixels' windows reach together."""
    changes = ((first[1:] != first[:-1]) | (end[1:] != end[:-1])).nonzero().flatten() + 1
    bounds = [0, *changes.tolist(), len(first)]
    spans, start = [], 0
    for stop in bounds[1:]:
        if stop - start >= least or stop == len(first):
            spans.append((start, stop, int(first[start]), int(end[stop - 1])))
            start = stop
    return spans


class CrossAttentionBlock(nn.Module):
    """A 3x3 convolution of the queries, then the windowed cross-attention (`chunked_attention.py`)."""

    def __init__(self, qk_dim: int, num_heads: int, window_ratio: float = 0.1):
        super().__init__()
        self.cross_attn = CrossAttention(qk_dim, num_heads)
        self.window_ratio = window_ratio
        self.conv2d = nn.Conv2d(qk_dim, qk_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_chunk_size: int | None = None,
                reach: tuple[float, float] | None = None) -> torch.Tensor:
        q = self.conv2d(q)
        b, _, h, w = q.shape
        h_k, w_k = k.shape[-2:]
        c = v.shape[1]
        q = q.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        k = k.permute(0, 2, 3, 1).reshape(b, h_k * w_k, -1)
        v = v.permute(0, 2, 3, 1).reshape(b, h_k * w_k, -1)
        features = self.cross_attn(q, k, v, (h, w), (h_k, w_k), self.window_ratio, q_chunk_size, reach)
        return features.view(b, h, w, c).permute(0, 3, 1, 2)


def coordinates(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, h*w, 2) row and column coordinates from 0 to 1 (`anyup/utils/img.py`, create_coordinate)."""
    rows = torch.linspace(0.0, 1.0, h, device=device, dtype=dtype)
    columns = torch.linspace(0.0, 1.0, w, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(rows, columns, indexing="ij")
    return torch.stack((yy, xx), -1).view(1, h * w, 2)


class AnyUp(nn.Module):
    """The AnyUp upsampler (`anyup/model.py`) with its default architecture: 128 query/key channels, 4 heads,
    windows of 0.1 of the image around each pixel; 0.88 M parameters, the release checkpoints' keys."""

    def __init__(self, input_dim: int = 3, qk_dim: int = 128, kernel_size: int = 1, kernel_size_lfu: int = 5,
                 window_ratio: float = 0.1, num_heads: int = 4):
        super().__init__()
        self.qk_dim = qk_dim
        self.window_ratio = window_ratio
        self.image_encoder = self._encoder(nn.Conv2d(input_dim, qk_dim, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=False))
        self.key_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False))
        self.query_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False))
        self.key_features_encoder = self._encoder(LearnedFeatureUnification(qk_dim, kernel_size_lfu))
        self.cross_decode = CrossAttentionBlock(qk_dim, num_heads, window_ratio)
        self.aggregation = self._encoder(nn.Conv2d(2 * qk_dim, qk_dim, 3, padding=1, padding_mode="reflect", bias=False))
        self.rope = RoPE(qk_dim)

    def _encoder(self, first: nn.Module, layers: int = 2) -> nn.Sequential:
        return nn.Sequential(first, *[ResBlock(self.qk_dim, self.qk_dim) for _ in range(layers)])

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int] | None = None,
                q_chunk_size: int | None = None, values: torch.Tensor | None = None,
                whole_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """`features` (B, C, h, w) at the resolution of `image` (B, 3, H, W), or at `output_size`. With `values`
        (B, K, h, w), the attention that `features` decide mixes `values` instead: upsampling an affine map of the
        features (a feature space) equals mapping the upsampled features, as every weight row sums to one.
        `whole_grid`: the token grid of the whole image when this is a tile of it, so that each pixel's attention
        window spans as many tokens as in the whole image (the official's windows are a fraction of its input)."""
        output_size = tuple(output_size) if output_size is not None else tuple(image.shape[-2:])
        enc = self.image_encoder(image)
        b, d, h, w = enc.shape
        enc = self.rope(enc.permute(0, 2, 3, 1).reshape(b, h * w, d), coordinates(h, w, enc.device, enc.dtype))
        enc = enc.view(b, h, w, d).permute(0, 3, 1, 2)
        q = F.adaptive_avg_pool2d(self.query_encoder(enc), output_size=output_size)
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), output_size=features.shape[-2:])
        del enc
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(features, dim=1))], dim=1))
        reach = None if whole_grid is None else (self.window_ratio * whole_grid[0], self.window_ratio * whole_grid[1])
        return self.cross_decode(q, k, features if values is None else values, q_chunk_size=q_chunk_size, reach=reach)


def peak_bytes(height: int, width: int) -> int:
    """A generous bound on the memory AnyUp takes for an image of height x width pixels, beside its output: the
    128-channel encoders at full resolution (about eight such maps at once) and one chunk of attention."""
    return 8 * 128 * 4 * height * width + 2 * ATTENTION_BYTES


def weights_file(path: str | os.PathLike | None = None) -> Path:
    """The AnyUp weights to load: `path`, else $DINOFEAT_ANYUP_WEIGHTS, else the default release file from the
    weights cache (downloaded once, its sha256 checked against the authors' file on every load)."""
    from .weights import cache_dir, download, file_sha256

    chosen = path or os.environ.get(WEIGHTS_VARIABLE)
    if chosen:
        if not Path(chosen).is_file():
            raise DinofeatError(f"the AnyUp weights file {chosen} does not exist; give the path of {DEFAULT_CHECKPOINT} "
                                f"or anyup_paper.pth from {ANYUP_CHECKPOINTS[DEFAULT_CHECKPOINT][0].rsplit('/', 2)[0]}.")
        return Path(chosen)
    url, sha256 = ANYUP_CHECKPOINTS[DEFAULT_CHECKPOINT]
    target = cache_dir() / DEFAULT_CHECKPOINT
    if not (target.is_file() and file_sha256(target) == sha256):
        download(url, target)
        if file_sha256(target) != sha256:
            target.unlink()
            raise DinofeatError(f"the download of {url} does not have the authors' sha256; run the command again, or pass "
                                "the file with --upsampler-weights PATH.")
    return target


def load_anyup(path: str | os.PathLike) -> AnyUp:
    """An AnyUp holding the weights of an official checkpoint file (read without unpickling code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a weights file
        raise DinofeatError(f"cannot read AnyUp weights from {path} ({type(error).__name__}); give {DEFAULT_CHECKPOINT} "
                            "or anyup_paper.pth as released by the authors.") from None
    model = AnyUp()
    if not isinstance(state, dict) or set(state) != set(model.state_dict()):
        raise DinofeatError(f"{path} is not an AnyUp checkpoint (its keys differ from the release files'); give "
                            f"{DEFAULT_CHECKPOINT} or anyup_paper.pth as released by the authors.")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise DinofeatError(f"{path} holds an AnyUp of another size than the released one (128 channels, 4 heads); "
                            f"give {DEFAULT_CHECKPOINT} or anyup_paper.pth as released by the authors.") from None
    return model.eval()


def covered_rows(offset: float, stride: float, tokens: int) -> tuple[int, int]:
    """(first, end) pixel of the band a token grid covers along one axis: token i's cell is the `stride` pixels
    centred on offset + i * stride."""
    first = round(offset - stride / 2 + 0.5)
    return first, first + round(tokens * stride)


@dataclass(frozen=True)
class AnyUpUpsampler:
    """AnyUp as an upsampler of the views (views.py): each view's tokens with the image pixels they cover.

    AnyUp takes a token grid to cover its image evenly; a ViT's grid covers the band of pixels its cells span,
    shifted by the view's offset (`TokenPlacement`). So AnyUp sees exactly that band of the image (padded by
    replication where a shifted view's band leaves the image) and upsamples to it; pixels outside the band take
    the nearest band pixel's features. An untiled image at stride = patch and a side that is a multiple of the
    patch is one band: the official AnyUp on the whole image."""

    model: AnyUp

    def __call__(self, tokens: torch.Tensor, placement: TokenPlacement, size: tuple[int, int], image: torch.Tensor,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None, whole_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """tokens (1, C, h, w) placed by `placement` in `image` (1, 3, H, W) -> (1, K, H, W), mapped by `affine`;
        `whole_grid`: the whole image's token grid where `image` is a tile (see AnyUp.forward)."""
        h, w = tokens.shape[-2:]
        height, width = size
        top, bottom = covered_rows(placement.offset_y, placement.stride, h)
        left, right = covered_rows(placement.offset_x, placement.stride, w)
        pad = (max(0, -left), max(0, right - width), max(0, -top), max(0, bottom - height))
        band = F.pad(image, pad, mode="replicate") if any(pad) else image
        band = band[..., top + pad[2] : bottom + pad[2], left + pad[0] : right + pad[0]]
        values = None
        if affine is not None:
            weight, bias = (t.to(tokens.device) for t in affine)
            values = torch.einsum("kc,bchw->bkhw", weight, tokens) + bias[None, :, None, None]
        features = self.model(band.to(tokens.dtype), tokens, values=values, whole_grid=whole_grid)
        iy = (torch.arange(height, device=tokens.device) - top).clamp(0, bottom - top - 1)
        ix = (torch.arange(width, device=tokens.device) - left).clamp(0, right - left - 1)
        if top == 0 and left == 0 and bottom == height and right == width:
            return features
        return features[:, :, iy][:, :, :, ix]


@functools.lru_cache(maxsize=4)
def loaded_upsampler(path: str, device: torch.device) -> AnyUpUpsampler:
    """The AnyUp of the weights file `path` on `device`, loaded once per process and shared by every request."""
    return AnyUpUpsampler(load_anyup(path).to(device))
