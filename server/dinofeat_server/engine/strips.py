"""Compute a local filter bank in horizontal strips, exactly as on the whole image.

A filter whose output at a pixel depends only on inputs within `halo` rows of it can run on strips
of rows extended by `halo` real (or, at the image border, mirrored) rows each side; cropping the
extension gives the whole-image result. Strips bound memory, keep temporaries small, and let the
server stream the first rows of a large stack while later rows are still being computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .filters import mirror_pad

STRIP_ROWS = 256
"""Rows per strip at least, and the unit of strip heights: one row of (1, 256, 256) HDF5 chunks."""
STRIP_BYTES = 256 << 20
"""A strip's bank output (halo included) may take this much; taller strips repeat less halo."""


def strip_rows(height: int, width: int, channels: int, halo: int, budget: int = STRIP_BYTES) -> int:
    """Rows per strip: the most whole multiples of STRIP_ROWS whose float32 output of `channels`
    channels, with `halo` rows each side, fits `budget` bytes (at least STRIP_ROWS). A wide halo
    computed again for every strip can cost more than the strip itself."""
    per_row = width * channels * 4
    fitting = (budget // per_row - 2 * halo) // STRIP_ROWS * STRIP_ROWS
    return max(STRIP_ROWS, min(fitting, -(-height // STRIP_ROWS) * STRIP_ROWS))


def feature_strips(
    bank: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    halo: int,
    rows: int = STRIP_ROWS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, bank(images)[..., first_row:first_row + rows, :]) for each strip.

    `bank` maps (N, C, H, W) to (..., H, W) and must depend on at most `halo` rows around each pixel,
    mirroring the input at its borders. An image of at most `rows` rows is one strip, computed whole.
    """
    height = images.shape[-2]
    if rows >= height:  # one strip: the bank mirrors the borders itself, so no halo rows to compute and crop
        yield 0, bank(images)
        return
    padded = mirror_pad(images, halo, 0)
    for y0 in range(0, height, rows):
        y1 = min(y0 + rows, height)
        out = bank(padded[..., y0 : y1 + 2 * halo, :])
        yield y0, out[..., halo : halo + (y1 - y0), :]
