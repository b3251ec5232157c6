"""From a low-resolution token grid to full image resolution, placing every token where it belongs.

A token (i, j) of a ViT run with patch p and stride s summarises the pixels [i s, i s + p) of its
view, so its centre sits at pixel (i s + (p - 1) / 2) plus the view's own offset. `TokenPlacement`
carries that mapping; every upsampler takes the same arguments, so a learned upsampler can be added
as one more function with this signature:

    upsampler(tokens (B, C, h, w), placement, size (H, W), guide (B, 1, H, W)) -> (B, C, H, W)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenPlacement:
    """Pixel coordinates of token centres: row i at offset_y + i * stride (likewise columns)."""

    stride: float
    offset_y: float
    offset_x: float

    def token_coordinates(self, pixels: int, axis: str, device: torch.device) -> torch.Tensor:
        """Continuous token coordinate of each pixel centre along an axis."""
        offset = self.offset_y if axis == "y" else self.offset_x
        return (torch.arange(pixels, device=device, dtype=torch.float32) - offset) / self.stride


Upsampler = Callable[[torch.Tensor, TokenPlacement, tuple[int, int], torch.Tensor | None], torch.Tensor]
LearnedUpsampler = Callable[[torch.Tensor, TokenPlacement, tuple[int, int], torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None,
                             tuple[int, int] | None], torch.Tensor]
"""A learned upsampler (AnyUp, anyup.py): raw tokens, placement, size, the normalised image (1, 3, H, W), the
feature space's affine map, which it applies itself (its weights depend on the raw tokens), and the whole image's
token grid where the image is a tile (None: untiled) -> (1, K, H, W)."""


def nearest(tokens: torch.Tensor, placement: TokenPlacement, size: tuple[int, int], guide: torch.Tensor | None = None) -> torch.Tensor:
    """Each pixel takes the token whose centre is nearest."""
    h, w = tokens.shape[-2:]
    iy = placement.token_coordinates(size[0], "y", tokens.device).round().clamp(0, h - 1).long()
    ix = placement.token_coordinates(size[1], "x", tokens.device).round().clamp(0, w - 1).long()
    return tokens[:, :, iy][:, :, :, ix]


def bilinear(tokens: torch.Tensor, placement: TokenPlacement, size: tuple[int, int], guide: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear interpolation between token centres; pixels beyond the outermost centres take the edge."""
    b, c, h, w = tokens.shape
    ty = placement.token_coordinates(size[0], "y", tokens.device)
    tx = placement.token_coordinates(size[1], "x", tokens.device)
    gy = 2.0 * ty / max(h - 1, 1) - 1.0 if h > 1 else torch.zeros_like(ty)
    gx = 2.0 * tx / max(w - 1, 1) - 1.0 if w > 1 else torch.zeros_like(tx)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].expand(b, -1, -1, -1)
    return F.grid_sample(tokens, grid.to(tokens.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def joint_bilateral(tokens: torch.Tensor, placement: TokenPlacement, size: tuple[int, int], guide: torch.Tensor | None,
                    sigma_spatial: float = 1.0, sigma_range: float = 0.15, radius: int = 1) -> torch.Tensor:
    """Joint bilateral upsampling (Kopf et al. 2007), training-free and guided by the image.

    Each pixel averages the (2 radius + 1)^2 tokens around its nearest token, weighted by a spatial
    Gaussian over token-grid distance (`sigma_spatial`, in tokens) times a range Gaussian over the
    guide's difference between the pixel and the token's centre pixel (`sigma_range`, in guide units:
    the guide is the image in its feature space's input range, about [0, 1], the same for every tile).
    Tokens across an edge of the guide get little weight, so edges stay sharp.

    Pixels sharing a nearest token share its neighbourhood, so the work is one small matrix product
    per token row: (C x K) neighbourhood features times (K x pixels) weights.
    """
    if guide is None:
        raise ValueError("joint bilateral upsampling needs the image as its guide")
    b, c, h, w = tokens.shape
    height, width = size
    device = tokens.device
    guide = guide.float()
    ty = placement.token_coordinates(height, "y", device)
    tx = placement.token_coordinates(width, "x", device)
    ny, nx = ty.round().clamp(0, h - 1).long(), tx.round().clamp(0, w - 1).long()
    centre_y = (placement.offset_y + torch.arange(h, device=device) * placement.stride).round().clamp(0, height - 1).long()
    centre_x = (placement.offset_x + torch.arange(w, device=device) * placement.stride).round().clamp(0, width - 1).long()
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    weights = []
    for dy, dx in offsets:
        iy, ix = ny + dy, nx + dx
        valid = ((iy >= 0) & (iy < h))[:, None] & ((ix >= 0) & (ix < w))[None, :]
        iy, ix = iy.clamp(0, h - 1), ix.clamp(0, w - 1)
        spatial = torch.exp(-((ty - iy)[:, None] ** 2 + (tx - ix)[None, :] ** 2) / (2 * sigma_spatial**2)) * valid
        token_guide = guide[:, :, centre_y[iy]][:, :, :, centre_x[ix]]
        weights.append(spatial * torch.exp(-((guide - token_guide) ** 2) / (2 * sigma_range**2))[:, 0])
    weights = torch.stack(weights, dim=1)  # (B, K, H, W)
    weights = (weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)).to(tokens.dtype)
    kernel = 2 * radius + 1
    neighbourhoods = F.unfold(tokens, kernel, padding=radius).view(b, c, kernel * kernel, h, w)
    out = tokens.new_empty(b, c, height, width)
    for i in range(h):
        rows = (ny == i).nonzero().flatten()
        if len(rows) == 0:
            continue
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        features = neighbourhoods[:, :, :, i, :][..., nx].permute(0, 3, 1, 2).contiguous()  # (B, W, C, K)
        row_weights = weights[:, :, y0:y1].permute(0, 3, 1, 2).contiguous()  # (B, W, K, rows)
        out[:, :, y0:y1] = torch.matmul(features, row_weights).permute(0, 2, 3, 1)  # (B, C, rows, W)
    return out


UPSAMPLERS: dict[str, Upsampler] = {"nearest": nearest, "bilinear": bilinear, "joint_bilateral": joint_bilateral}
