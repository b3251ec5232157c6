"""Pictures people would rather look at than read: class maps over their image (numpy only)."""

from __future__ import annotations

import numpy as np

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], dtype=np.float32)


def display_grey(image: np.ndarray) -> np.ndarray:
    """An 8-bit greyscale view of a 2-D image (RGB averaged), stretched between the 0.5 and 99.5 percentiles."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)
    low, high = np.percentile(grey, (0.5, 99.5))
    return np.clip((grey - low) / max(high - low, 1e-12) * 255.0, 0, 255).astype(np.uint8)


def class_overlay(image: np.ndarray, class_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture: each class in its own colour, blended over the greyscale image."""
    grey = display_grey(image).astype(np.float32)[..., None].repeat(3, axis=-1)
    values = np.unique(class_map)
    colours = np.zeros(grey.shape, np.float32)
    for i, value in enumerate(values):
        colours[class_map == value] = PALETTE[i % len(PALETTE)]
    return np.clip((1 - alpha) * grey + alpha * colours, 0, 255).astype(np.uint8)



def probability_pictures(probabilities) -> list[tuple[int, np.ndarray]]:
    """(class value, 8-bit greyscale picture) for each class of a (K, Y, X) probabilities dataset."""
    values = [int(v) for v in probabilities.attrs["class_values"]]
    return [(v, (np.asarray(probabilities[k]) * 255).round().astype(np.uint8)) for k, v in enumerate(values)]
