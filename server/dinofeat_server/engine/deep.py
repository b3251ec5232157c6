"""Full-resolution DINOv2 features (and CLS attention maps) of one 2-D image.

Presets trade quality for time:
- `fast`: stride 14, one view, joint bilateral upsampling guided by the image;
- `default`: stride 7, 9 reflect-shifted views (3 px in 8 directions), aligned bilinear upsampling;
- `paper`: stride 4, 17 views (1 and 2 px in 8 directions), the reference's exact algorithm;
- `paper_flips`: the same with the reference's 4 flips (68 views).
Images larger than the memory budget are cut into overlapping tiles whose results are blended with
linear ramps, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from dinofeat_client.errors import DinofeatError

from .backbone import DinoVisionTransformer, imagenet_normalised, token_grid
from .views import TileOrigin, ViewSpec, view_ensemble

PRESETS: dict[str, ViewSpec] = {
    "fast": ViewSpec(stride=14, upsampler="joint_bilateral"),
    "default": ViewSpec(stride=7, distances=(3,), directions=8, upsampler="bilinear"),
    "paper": ViewSpec(stride=4, distances=(1, 2), directions=8, mode="paper"),
    "paper_flips": ViewSpec(stride=4, distances=(1, 2), directions=8, flips=True, mode="paper"),
}
DEFAULT_BUDGET_BYTES = 4 << 30
TILE_OVERLAP = 56
"""Pixels shared by neighbouring tiles (4 patches), blended with linear ramps."""


def preset(name: str) -> ViewSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise DinofeatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None


def model_input(image: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, X) or (Y, X, 3) intensities in [0, 1] -> ImageNet-normalised (1, 3, Y, X) and a (1, 1, Y, X) guide.

    Greyscale is repeated to three channels, as the reference does (ToTensor + Normalize)."""
    planes = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else np.moveaxis(image, -1, 0)
    rgb = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None].to(device)
    return imagenet_normalised(rgb), rgb.mean(dim=1, keepdim=True)


def estimated_bytes(height: int, width: int, channels: int, model: DinoVisionTransformer, spec: ViewSpec, batch: int) -> int:
    """A generous estimate of the memory one tile needs: ViT activations of a batch of views plus
    the full-resolution view, accumulator and upsampling temporaries."""
    tokens = token_grid(height, model.config.patch, spec.stride) * token_grid(width, model.config.patch, spec.stride)
    activations = batch * (tokens + 5) * model.config.dim * 4 * 12
    full_resolution = channels * height * width * 4 * (4 if spec.upsampler == "joint_bilateral" else 3)
    return activations + full_resolution


@dataclass(frozen=True)
class Tile:
    y0: int
    x0: int
    height: int
    width: int


def tile_plan(height: int, width: int, edge: int, overlap: int = TILE_OVERLAP, align: int = 1) -> list[Tile]:
    """Overlapping tiles of at most edge x edge pixels covering the image, neighbours sharing at least
    `overlap` pixels. Tiles start on multiples of `align` (the stride, so a tile's tokens fall on the
    whole image's token grid)."""
    def spans(size: int) -> list[tuple[int, int]]:
        if size <= edge:
            return [(0, size)]
        count = math.ceil((size - edge) / (edge - overlap - align)) + 1
        step = (size - edge) / (count - 1)
        starts = sorted({int(i * step) // align * align for i in range(count - 1)} | {math.ceil((size - edge) / align) * align})
        return [(s, min(s + edge, size)) for s in starts]

    return [Tile(y0, x0, y1 - y0, x1 - x0) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def blend_ramp(length: int, start: int, total: int, overlap: int) -> torch.Tensor:
    """1-D weights of a tile: rising over `overlap` pixels where it has a neighbour before, falling after."""
    ramp = torch.ones(length)
    edge = torch.linspace(0, 1, overlap + 2)[1:-1]
    if start > 0:
        ramp[:overlap] = torch.minimum(ramp[:overlap], edge)
    if start + length < total:
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], edge.flip(0))
    return ramp


class DeepExtractor:
    """A loaded DINOv2 model on one device, computing full-resolution features within a memory budget."""

    def __init__(self, model: DinoVisionTransformer, device: torch.device, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.model = model.to(device).eval()
        self.device = device
        self.budget_bytes = budget_bytes

    def channels(self, what: str) -> int:
        return self.model.config.heads if what == "attention" else self.model.config.dim

    def plan(self, height: int, width: int, spec: ViewSpec, what: str) -> tuple[int, int]:
        """(tile edge, views per batch) fitting the budget: whole image if it fits, else the largest tile.

        Tiles are never smaller than four overlaps plus a stride; a budget below what such a tile
        needs is exceeded rather than refused."""
        channels = self.channels(what)
        batch = min(spec.view_count(), 8)
        while batch > 1 and estimated_bytes(height, width, channels, self.model, spec, batch) > self.budget_bytes:
            batch //= 2
        edge = max(height, width)
        while edge > 4 * TILE_OVERLAP + spec.stride and estimated_bytes(min(edge, height), min(edge, width), channels, self.model, spec, batch) > self.budget_bytes:
            edge = int(edge * 0.8)
        return edge, batch

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def features(self, image: np.ndarray, spec: ViewSpec, what: str = "tokens",
                 check: Callable[[], None] = lambda: None) -> torch.Tensor:
        """(C, Y, X) float32 on the CPU: patch-token features (what="tokens") or CLS attention per head."""
        height, width = image.shape[:2]
        patch = self.model.config.patch
        if min(height, width) < patch:
            raise DinofeatError(f"the image is {height}x{width} pixels; DINOv2 features need at least {patch}x{patch}.")
        edge, batch = self.plan(height, width, spec, what)
        normalised, guide = model_input(image, self.device)
        tiles = tile_plan(height, width, edge, align=spec.stride)
        with torch.inference_mode(), self.autocast():
            if len(tiles) == 1:
                return view_ensemble(self.model, normalised, guide, spec, what, batch, check)[0].float().cpu()
            total = torch.zeros(self.channels(what), height, width)
            weight = torch.zeros(1, height, width)
            for tile in tiles:
                window = (..., slice(tile.y0, tile.y0 + tile.height), slice(tile.x0, tile.x0 + tile.width))
                origin = TileOrigin(height, width, tile.y0, tile.x0)
                out = view_ensemble(self.model, normalised[window], guide[window], spec, what, batch, check, origin)[0].float().cpu()
                ramp = (blend_ramp(tile.height, tile.y0, height, TILE_OVERLAP)[:, None]
                        * blend_ramp(tile.width, tile.x0, width, TILE_OVERLAP)[None, :])
                total[window] += out * ramp
                weight[window] += ramp
            return total / weight
