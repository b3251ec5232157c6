"""Tiles: the unit of work, streaming and memory of the deep feature sets.

An image too large for one pass is cut into overlapping tiles (`tile_plan`), each tile's features
are weighted by linear ramps over the overlap (`blend_ramp`), and `TileBlender` adds them into a band
of rows that is handed on, in strips of whole chunk rows, as soon as no later tile touches them. The
band holds at most one row of tiles plus one strip, so memory depends on the tile size, the image
width and the channel count, never on the image height.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

TILE_OVERLAP = 56
"""Pixels shared by neighbouring tiles (4 patches of 14), blended with linear ramps."""


@dataclass(frozen=True)
class Tile:
    """A window of the image in pixels: rows y0 .. y0 + height, columns x0 .. x0 + width."""

    y0: int
    x0: int
    height: int
    width: int

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.height), slice(self.x0, self.x0 + self.width)


def tile_plan(height: int, width: int, edge: int, overlap: int = TILE_OVERLAP, align: int = 1) -> list[Tile]:
    """Overlapping tiles of at most edge x edge pixels covering the image, row by row; neighbours share
    at least `overlap` pixels. Tiles start on multiples of `align` (the stride, so a tile's tokens fall
    on the whole image's token grid)."""
    def spans(size: int) -> list[tuple[int, int]]:
        if size <= edge:
            return [(0, size)]
        count = math.ceil((size - edge) / (edge - overlap - align)) + 1
        step = (size - edge) / (count - 1)
        starts = sorted({int(i * step) // align * align for i in range(count - 1)} | {math.ceil((size - edge) / align) * align})
        return [(s, min(s + edge, size)) for s in starts]

    return [Tile(y0, x0, y1 - y0, x1 - x0) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def tile_rows(tiles: list[Tile]) -> list[list[Tile]]:
    """The plan's tiles grouped by their first row, top to bottom."""
    rows: dict[int, list[Tile]] = {}
    for tile in tiles:
        rows.setdefault(tile.y0, []).append(tile)
    return [rows[y0] for y0 in sorted(rows)]


def blend_ramp(length: int, start: int, total: int, overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """1-D weights of a tile: rising over `overlap` pixels where it has a neighbour before, falling after."""
    ramp = torch.ones(length)
    edge = torch.linspace(0, 1, overlap + 2)[1:-1]
    if start > 0:
        ramp[:overlap] = torch.minimum(ramp[:overlap], edge)
    if start + length < total:
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], edge.flip(0))
    return ramp


class TileBlender:
    """Ramp-weighted sum of tile features over a band of rows, released in finished strips.

    Tiles must come row of tiles by row of tiles (as `tile_plan` orders them), none taller than
    `edge`. `add` takes one tile's (C, h, w) features; `finished(until)` yields (first_row,
    (C, rows, X)) strips of `strip_rows` rows (the last one shorter) that end at or before `until`, the
    first row a later tile may still touch. The band is allocated once, edge + strip_rows rows high.
    """

    def __init__(self, channels: int, height: int, width: int, strip_rows: int, edge: int):
        self.height, self.width, self.strip_rows = height, width, strip_rows
        rows = min(edge + strip_rows, height)
        self.start = 0  # image row of the band's first row: the first row not yet released
        self.total = torch.zeros(channels, rows, width)
        self.weight = torch.zeros(1, rows, width)

    def add(self, tile: Tile, features: torch.Tensor) -> None:
        ramp = blend_ramp(tile.height, tile.y0, self.height)[:, None] * blend_ramp(tile.width, tile.x0, self.width)[None, :]
        rows = slice(tile.y0 - self.start, tile.y0 + tile.height - self.start)
        columns = slice(tile.x0, tile.x0 + tile.width)
        self.total[:, rows, columns].add_(features * ramp)
        self.weight[:, rows, columns].add_(ramp)

    def finished(self, until: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Release every whole strip that ends at or before `until` (all remaining rows when `until` is the height)."""
        released = 0
        while self.start + released < self.height:
            first = self.start + released
            end = min(first + self.strip_rows, self.height)
            if end > until:
                break
            band = slice(released, end - self.start)
            yield first, self.total[:, band] / self.weight[:, band].clamp_min(1e-12)
            released = end - self.start
        if released:  # move the rows still being blended to the front of the band
            kept = self.total.shape[1] - released
            self.total[:, :kept] = self.total[:, released:].clone()
            self.weight[:, :kept] = self.weight[:, released:].clone()
            self.total[:, kept:] = 0
            self.weight[:, kept:] = 0
            self.start += released

    @staticmethod
    def band_bytes(channels: int, edge: int, width: int, strip_rows: int) -> int:
        """Largest memory of the band (sum, weight, the copy made when it moves, one released strip)."""
        return (channels + 1) * (2 * edge + strip_rows) * width * 4 + channels * strip_rows * width * 4
