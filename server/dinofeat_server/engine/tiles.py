"""Tiles: the unit of work, streaming and memory of the deep feature sets.

An image too large for one pass is cut into overlapping tiles (`tile_plan`), each tile's features
are weighted by linear ramps over the overlap (`blend_ramp`), and `TileBlender` adds them into
chunk-sized accumulators that are handed on as soon as no later tile touches them. Tiles go row by
row, left to right, so what is held is the current tile's chunks plus the chunk rows that the next
row of tiles will still overlap: memory depends on the tile size, the channel count and (through
that overlap) the image width, never on the image height.
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


def blend_order(rows: list[list[Tile]], height: int, width: int) -> list[tuple[Tile, int, int]]:
    """The tiles of `rows` in blending order, each with the row and column up to which accumulators are
    final once it is added: where the next row of tiles starts, and where the next tile of its row starts."""
    order = []
    for number, row in enumerate(rows):
        until_row = rows[number + 1][0].y0 if number + 1 < len(rows) else height
        for place, tile in enumerate(row):
            order.append((tile, until_row, row[place + 1].x0 if place + 1 < len(row) else width))
    return order


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
    """Ramp-weighted sum of tile features in `cell` x `cell` accumulators, released when final.

    Tiles must come row of tiles by row of tiles, left to right in each (as `tile_plan` orders them).
    `add` takes one tile's (C, h, w) features; `finished(until_row, until_column)` yields
    (first_row, first_column, (C, rows, columns)) blocks of accumulators that no later tile touches:
    those ending at or before `until_row` (where the next row of tiles starts) and `until_column`
    (where the next tile of this row starts). Released accumulators of one cell row that lie side by
    side leave as one block.
    """

    def __init__(self, channels: int, height: int, width: int, cell: int):
        self.channels, self.height, self.width, self.cell = channels, height, width, cell
        self.cells: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, tile: Tile, features: torch.Tensor) -> None:
        ramp = blend_ramp(tile.height, tile.y0, self.height)[:, None] * blend_ramp(tile.width, tile.x0, self.width)[None, :]
        weighted = features * ramp
        cell = self.cell
        for row in range(tile.y0 // cell * cell, tile.y0 + tile.height, cell):
            for column in range(tile.x0 // cell * cell, tile.x0 + tile.width, cell):
                total, weight = self.cells.get((row, column)) or self._new_cell(row, column)
                y0, y1 = max(row, tile.y0), min(row + cell, tile.y0 + tile.height)
                x0, x1 = max(column, tile.x0), min(column + cell, tile.x0 + tile.width)
                total[:, y0 - row : y1 - row, x0 - column : x1 - column] += weighted[:, y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0]
                weight[y0 - row : y1 - row, x0 - column : x1 - column] += ramp[y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0]

    def _new_cell(self, row: int, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, columns = min(self.cell, self.height - row), min(self.cell, self.width - column)
        pair = torch.zeros(self.channels, rows, columns), torch.zeros(rows, columns)
        self.cells[row, column] = pair
        return pair

    def finished(self, until_row: int, until_column: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Release every accumulator that ends at or before both limits, in runs along each cell row."""
        done = sorted(key for key in self.cells
                      if min(key[0] + self.cell, self.height) <= until_row and min(key[1] + self.cell, self.width) <= until_column)
        runs: list[list[tuple[int, int]]] = []
        for key in done:
            if runs and runs[-1][-1][0] == key[0] and runs[-1][-1][1] + self.cell == key[1]:
                runs[-1].append(key)
            else:
                runs.append([key])
        for run in runs:
            pairs = [self.cells.pop(key) for key in run]
            total = torch.cat([p[0] for p in pairs], dim=2)
            weight = torch.cat([p[1] for p in pairs], dim=1)
            yield run[0][0], run[0][1], total / weight.clamp_min(1e-12)

    @staticmethod
    def most_bytes(channels: int, tiles: list[Tile], width: int, cell: int) -> int:
        """A bound on what the accumulators hold for a plan: the cell rows that the next row of tiles
        overlaps, across the width, plus one tile's cells and one released run."""
        rows = tile_rows(tiles)
        overlap = max([a[0].y0 + a[0].height - b[0].y0 for a, b in zip(rows, rows[1:])], default=0)
        waiting = (math.ceil(overlap / cell) + 1) * cell * (width + cell) if overlap else 0
        edge = max(t.height for t in tiles)
        return (channels + 1) * 4 * (waiting + (edge + 2 * cell) ** 2) + channels * 4 * cell * width
