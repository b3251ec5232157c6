"""Request values checked before any work, each refused with one sentence (INVALID_ARGUMENT) instead of
failing deep in scikit-learn or torch (UNKNOWN with an internal message)."""

from __future__ import annotations

import math

import numpy as np
from dinofeat_client.errors import DinofeatError
from dinofeat_client.images import spatial_shape

from .config import ServerLimits

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


def label_classes(labels: list[np.ndarray]) -> int:
    """Distinct non-zero values over label images (8- and 16-bit counted in one pass, without sorting)."""
    present = np.zeros(1 << 16, bool)
    others: set[int] = set()
    for label in labels:
        if label.dtype in (np.uint8, np.uint16):
            present[: 1 << (8 * label.dtype.itemsize)] |= np.bincount(label.ravel(), minlength=1 << (8 * label.dtype.itemsize)) > 0
        else:
            others.update(int(v) for v in np.unique(label))
    others.update(int(v) for v in np.flatnonzero(present))
    return len(others - {0})


def check_classes(labels: list[np.ndarray], limits: ServerLimits, image: np.ndarray | None = None) -> None:
    """Refuse labels of more classes than max_channels (each class is a probability channel and a float64 in
    every tree node) and, with the `image` they predict, probabilities beyond max_output_gb; before any work."""
    check_probabilities(label_classes(labels), image, limits)


def check_probabilities(classes: int, image: np.ndarray | None, limits: ServerLimits) -> None:
    """Refuse `classes` classes beyond max_channels, or their float32 probabilities of every pixel of `image`
    (when given) beyond max_output_gb."""
    if classes > limits.max_channels:
        raise DinofeatError(f"{classes} classes would give {classes} probability channels, more than this server's limit of "
                            f"{limits.max_channels} (max_channels); label fewer classes.")
    size = classes * int(np.prod(spatial_shape(image))) * 4 if image is not None else 0
    if size > limits.max_output_gb * (1 << 30):
        raise DinofeatError(f"the probabilities of {classes} classes for this image would take {size / (1 << 30):.1f} GiB, more "
                            f"than this server's limit of {limits.max_output_gb:g} GiB (max_output_gb); use fewer classes or a "
                            "smaller image.")
