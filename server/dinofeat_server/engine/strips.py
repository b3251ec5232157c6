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
"""Rows per strip: one row of (1, 256, 256) HDF5 chunks."""


def feature_strips(
    bank: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    halo: int,
    rows: int = STRIP_ROWS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, bank(images)[..., first_row:first_row + rows, :]) for each strip.

    `bank` maps (N, C, H, W) to (..., H, W) and must depend on at most `halo` rows around each pixel,
    mirroring the input at its borders.
    """
    height = images.shape[-2]
    padded = mirror_pad(images, halo, 0)
    for y0 in range(0, height, rows):
        y1 = min(y0 + rows, height)
        out = bank(padded[..., y0 : y1 + 2 * halo, :])
        yield y0, out[..., halo : halo + (y1 - y0), :]
