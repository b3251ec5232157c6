"""The deterministic sample a feature space is fitted on: evenly spread crops of a dataset's planes.

A dataset (one image, a volume, or several training images) is a list of 2-D planes. Its space is
fitted on `SAMPLE_FRACTION` of its pixels (at least one crop, at most `MAX_CROPS`), in square crops of
`SAMPLE_EDGE` pixels (or the plane, if smaller) spread evenly over evenly chosen planes, and on an
evenly strided grid of pixels inside each crop. The same dataset always gives the same sample.
"""

from __future__ import annotations

import math

import numpy as np

from .tiles import Tile

SAMPLE_EDGE = 448
"""Edge of a sample crop in pixels (32 patches of 14): enough context for DINOv2, cheap to compute."""
SAMPLE_FRACTION = 1 / 8
"""Share of a large dataset's pixels the sample crops cover."""
MAX_CROPS = 16
SAMPLE_BYTES = 48 << 20
"""Memory of the sampled feature vectors (pixels x channels x 4 bytes)."""


def sample_crops(shapes: list[tuple[int, int]], edge: int = SAMPLE_EDGE) -> list[tuple[int, Tile]]:
    """(plane index, crop) pairs: crops of at most edge x edge pixels, spread over the planes."""
    area = sum(h * w for h, w in shapes)
    count = min(MAX_CROPS, max(1, math.ceil(area * SAMPLE_FRACTION / edge**2)))
    planes = np.unique(np.linspace(0, len(shapes) - 1, min(count, len(shapes))).round().astype(int))
    per_plane = [count // len(planes) + (i < count % len(planes)) for i in range(len(planes))]
    crops = []
    for z, n in zip(planes, per_plane):
        height, width = shapes[z]
        ch, cw = min(edge, height), min(edge, width)
        side = math.ceil(math.sqrt(n))
        ys = np.linspace(0, height - ch, side).round().astype(int)
        xs = np.linspace(0, width - cw, side).round().astype(int)
        cells = [(y, x) for y in ys for x in xs]
        for i in np.linspace(0, len(cells) - 1, n).round().astype(int):
            y, x = cells[i]
            crops.append((int(z), Tile(int(y), int(x), ch, cw)))
    return crops


def pixel_stride(crop: Tile, pixels: int) -> int:
    """Stride of an evenly spaced grid giving about `pixels` pixels of the crop."""
    return max(1, math.ceil(math.sqrt(crop.height * crop.width / max(pixels, 1))))


def sample_pixels(features: np.ndarray, stride: int) -> np.ndarray:
    """(N, C) feature vectors of a (C, h, w) crop on a grid of `stride` pixels, offset to the cell centres."""
    start = stride // 2
    grid = features[:, start::stride, start::stride]
    return grid.reshape(grid.shape[0], -1).T
