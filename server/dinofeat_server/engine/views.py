"""Shift/flip view ensembles: run the ViT on shifted and flipped copies of the image, bring every
view's tokens back to the image's own pixel grid, and average.

Two modes:
- "paper" reproduces the reference implementation of seed 000 (HR-Dv2) exactly, quirks included:
  torch.roll (wrap-around) shifts, the flip set [identity, hflip, identity, vflip], each view built
  as flip(shift(x)) and undone as unflip(unshift(y)) (the reference's order: the shift is undone in
  flipped coordinates, so a view that is both shifted and flipped lands mirrored by its shift; the
  paper's 68-view figures were made this way), each view's tokens resized to the image size with
  `nearest-exact`, the mean; and the reference's position-embedding rule for every backbone
  (`backbone.PosRule` "hr_dv2"). Exact for an untiled image: tiles roll within the tile.
- "aligned" (the default) shifts with reflected borders instead of wrapping the far edge in, uses the
  distinct flips [identity, hflip, vflip, both], and places each token at its true pixel centre
  (view offset and flip included) before upsampling, so no view is misregistered by half a patch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import DinoVisionTransformer, PosRule, PosWindow, token_grid
from .progress import run_to_end
from .upsample import UPSAMPLERS, LearnedUpsampler, TokenPlacement

DIRECTIONS = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
"""Shift directions (dy, dx): the first 4 are the axis directions, all 8 include the diagonals."""


@dataclass(frozen=True)
class ViewSpec:
    """How to sample and resample the token grid."""

    stride: int = 14
    distances: tuple[int, ...] = ()
    directions: int = 8
    flips: bool = False
    mode: str = "aligned"
    upsampler: str = "bilinear"

    def shifts(self) -> list[tuple[int, int]]:
        """The identity, then every distance in every direction: 1 + len(distances) * directions views."""
        return [(0, 0)] + [(d * uy, d * ux) for d in self.distances for uy, ux in DIRECTIONS[: self.directions]]

    def flip_set(self) -> list[tuple[bool, bool]]:
        """(vertical, horizontal) flips: the paper's [id, h, id, v] or the aligned mode's distinct four."""
        if not self.flips:
            return [(False, False)]
        if self.mode == "paper":
            return [(False, False), (False, True), (False, False), (True, False)]
        return [(False, False), (False, True), (True, False), (True, True)]

    def view_count(self) -> int:
        return len(self.shifts()) * len(self.flip_set())


def flipped(x: torch.Tensor, flip: tuple[bool, bool]) -> torch.Tensor:
    dims = [d for d, on in zip((-2, -1), flip) if on]
    return torch.flip(x, dims) if dims else x


@dataclass(frozen=True)
class TileOrigin:
    """Where the image being processed sits in a larger one (pixels), for position-consistent tiles."""

    full_height: int
    full_width: int
    y0: int
    x0: int


def tile_pos_window(origin: TileOrigin | None, size: tuple[int, int], flip: tuple[bool, bool], stride: int, patch: int) -> PosWindow | None:
    """The tile's window in the whole image's token grid, mirrored for flipped views."""
    if origin is None:
        return None
    rows, cols = token_grid(origin.full_height, patch, stride), token_grid(origin.full_width, patch, stride)
    tile_rows, tile_cols = token_grid(size[0], patch, stride), token_grid(size[1], patch, stride)
    row0, col0 = origin.y0 // stride, origin.x0 // stride
    if flip[0]:
        row0 = rows - row0 - tile_rows
    if flip[1]:
        col0 = cols - col0 - tile_cols
    row0, col0 = min(max(row0, 0), rows - tile_rows), min(max(col0, 0), cols - tile_cols)
    return PosWindow(rows, cols, row0, col0, origin.full_height == origin.full_width)


Affine = tuple[torch.Tensor, torch.Tensor] | None
"""(weight (k, C), bias (k,)) applied to every token before upsampling (a feature space), or None."""


def view_tokens(model: DinoVisionTransformer, images: torch.Tensor, stride: int, what: str,
                pos_window: PosWindow | None = None, affine: Affine = None, pos_rule: PosRule = "official") -> torch.Tensor:
    """Patch tokens (what="tokens") or last-block CLS attention per head ("attention"), float32,
    mapped by `affine` when given (upsampling and averaging are linear, so this equals mapping later)."""
    out = model(images, stride=stride, cls_attention=what == "attention", pos_window=pos_window, pos_rule=pos_rule)
    tokens = (out.cls_attention if what == "attention" else out.patch_tokens).float()
    if affine is None:
        return tokens
    weight, bias = (t.to(tokens.device) for t in affine)
    return torch.einsum("kc,bchw->bkhw", weight, tokens) + bias[None, :, None, None]


def view_batches(flips: list[tuple[bool, bool]], batch: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of up to `batch` consecutive views that share a flip; views are built per
    batch, so no more than one batch of image copies is held at a time."""
    start = 0
    while start < len(flips):
        end = start + 1
        while end < len(flips) and end - start < batch and flips[end] == flips[start]:
            end += 1
        yield start, end
        start = end


Steps = Generator[int, None, torch.Tensor]
"""Yields the number of views done after each batch; returns the averaged features."""


def paper_ensemble(model: DinoVisionTransformer, image: torch.Tensor, spec: ViewSpec, what: str,
                   batch: int = 1, check: Callable[[], None] = lambda: None, origin: TileOrigin | None = None,
                   affine: Affine = None) -> Steps:
    """The reference algorithm: roll, flip, ViT, nearest-exact resize, roll back, flip back, mean."""
    height, width = image.shape[-2:]
    undo = [(flip, dy, dx) for flip in spec.flip_set() for dy, dx in spec.shifts()]
    mean, count = None, 0
    for start, end in view_batches([u[0] for u in undo], batch):
        check()
        images = torch.cat([flipped(torch.roll(image, shifts=(dy, dx), dims=(-2, -1)), flip) for flip, dy, dx in undo[start:end]])
        window = tile_pos_window(origin, (height, width), undo[start][0], spec.stride, model.config.patch)
        tokens = view_tokens(model, images, spec.stride, what, window, affine, pos_rule="hr_dv2")
        for k in range(tokens.shape[0]):
            flip, dy, dx = undo[start + k]
            full = F.interpolate(tokens[k : k + 1], size=(height, width), mode="nearest-exact")
            full = flipped(torch.roll(full, shifts=(-dy, -dx), dims=(-2, -1)), flip)
            count += 1
            mean = full if mean is None else mean + (full - mean) / count
        yield count
    return mean


def view_placement(flip: tuple[bool, bool], dy: int, dx: int, grid: tuple[int, int], size: tuple[int, int],
                   stride: int, patch: int) -> TokenPlacement:
    """Where the tokens of an aligned view sit in the original image, after un-flipping the token grid.

    The view shows flipped-image pixel q + (dy, dx) at q, so its token i is centred on flipped pixel
    i * stride + (patch - 1) / 2 + dy; un-flipping mirrors that about the image's far edge.
    """
    centre = (patch - 1) / 2.0
    (rows, cols), (height, width) = grid, size
    offset_y = height - 1 - centre - (rows - 1) * stride - dy if flip[0] else centre + dy
    offset_x = width - 1 - centre - (cols - 1) * stride - dx if flip[1] else centre + dx
    return TokenPlacement(stride, offset_y, offset_x)


def aligned_views(image: torch.Tensor, spec: ViewSpec) -> list[tuple[torch.Tensor, tuple[bool, bool], int, int]]:
    """(view, flip, dy, dx) for every view: the flipped image, reflect-padded, cropped at the shift
    (crops are views of one padded copy per flip, not copies)."""
    height, width = image.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in spec.shifts())
    views = []
    for flip in spec.flip_set():
        source = flipped(image, flip)
        if pad:
            source = F.pad(source, (pad, pad, pad, pad), mode="reflect")
        for dy, dx in spec.shifts():
            views.append((source[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width], flip, dy, dx))
    return views


def aligned_ensemble(model: DinoVisionTransformer, image: torch.Tensor, guide: torch.Tensor, spec: ViewSpec, what: str,
                     batch: int = 1, check: Callable[[], None] = lambda: None, origin: TileOrigin | None = None,
                     affine: Affine = None, learned: LearnedUpsampler | None = None) -> Steps:
    """Reflect-padded shifts and flips, each view's tokens placed at their true pixel centres. A `learned`
    upsampler (AnyUp) takes the raw tokens, the image itself and `affine` (its weights depend on the tokens)."""
    size = image.shape[-2:]
    upsample = UPSAMPLERS[spec.upsampler] if learned is None else None
    patch = model.config.patch
    whole_grid = None if origin is None else (token_grid(origin.full_height, patch, spec.stride), token_grid(origin.full_width, patch, spec.stride))
    views = aligned_views(image, spec)
    total = None
    for start, end in view_batches([v[1] for v in views], batch):
        check()
        images = torch.cat([v[0] for v in views[start:end]])
        window = tile_pos_window(origin, tuple(size), views[start][1], spec.stride, model.config.patch)
        tokens = view_tokens(model, images, spec.stride, what, window, affine if learned is None else None)
        for k in range(tokens.shape[0]):
            _, flip, dy, dx = views[start + k]
            placement = view_placement(flip, dy, dx, tokens.shape[-2:], size, spec.stride, model.config.patch)
            if learned is not None:
                full = learned(flipped(tokens[k : k + 1], flip), placement, tuple(size), image, affine, whole_grid)
            else:
                full = upsample(flipped(tokens[k : k + 1], flip), placement, tuple(size), guide)
            total = full if total is None else total + full
        yield start + tokens.shape[0]
    return total / len(views)


def view_steps(model: DinoVisionTransformer, image: torch.Tensor, guide: torch.Tensor, spec: ViewSpec, what: str,
               batch: int = 1, check: Callable[[], None] = lambda: None, origin: TileOrigin | None = None,
               affine: Affine = None, learned: LearnedUpsampler | None = None) -> Steps:
    """Features (1, C, H, W) of one ImageNet-normalised image (1, 3, H, W) averaged over the views of `spec`,
    yielding the views done after each batch (for progress) and returning the features.

    `origin` marks the image as a tile of a larger one (position embeddings of the whole image);
    `affine` maps each view's tokens into a feature space (C becomes its k channels)."""
    if spec.mode == "paper":
        return (yield from paper_ensemble(model, image, spec, what, batch, check, origin, affine))
    return (yield from aligned_ensemble(model, image, guide, spec, what, batch, check, origin, affine, learned))


def view_ensemble(model: DinoVisionTransformer, image: torch.Tensor, guide: torch.Tensor, spec: ViewSpec, what: str,
                  batch: int = 1, check: Callable[[], None] = lambda: None, origin: TileOrigin | None = None,
                  affine: Affine = None) -> torch.Tensor:
    """`view_steps` run to the end: the features (1, C, H, W)."""
    return run_to_end(view_steps(model, image, guide, spec, what, batch, check, origin, affine))
