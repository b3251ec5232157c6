"""Request values checked before any work, each refused with one sentence (INVALID_ARGUMENT) instead of
failing deep in scikit-learn or torch (UNKNOWN with an internal message)."""

from __future__ import annotations

import math

import numpy as np
from dinofeat_client.errors import DinofeatError
from dinofeat_client.images import spatial_shape

SEED_LIMIT = 1 << 32
"""Seeds are scikit-learn random states: integers in [0, 2**32)."""


def checked_seed(seed: int) -> int:
    """A seed for Segment, Train and Analyse (proto int64), refused outside [0, 2**32)."""
    if not 0 <= seed < SEED_LIMIT:
        raise DinofeatError(f"the seed must be between 0 and {SEED_LIMIT - 1}, not {seed}.")
    return int(seed)


def check_grid(grid: int, window: int, images: list[np.ndarray]) -> None:
    """Refuse a few-shot grid and window that a support image is too small for.

    Each support plane (Y, X) is pooled to ceil(Y / grid) x ceil(X / grid) cells of `grid` pixels, and
    its prototypes are pooled over windows of `window` x `window` cells: a side with fewer cells than
    the window leaves no window at all (torch: "Output size is too small"). The query has no such
    limit: it is only pooled to the grid. `images` are the support images (2-D, RGB or stacks)."""
    if grid < 1 or window < 1:
        raise DinofeatError(f"the pooling window and the grid cell must be at least 1, not {window} and {grid}.")
    for number, image in enumerate(images, start=1):
        height, width = spatial_shape(image)[-2:]
        cells = (math.ceil(height / grid), math.ceil(width / grid))
        if min(cells) < window:
            which = f"support image {number}" if len(images) > 1 else "the support image"
            raise DinofeatError(f"{which} ({height} x {width} pixels) gives only {cells[0]} x {cells[1]} grid cells of "
                                f"{grid} pixels, fewer than the pooling window of {window} x {window} cells; give a smaller --grid or "
                                f"--window, or a support image of more than {(window - 1) * grid} pixels on each side.")
