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
    """RGB uint8 picture: each class in its own colour, blended over the greyscale image, with a
    legend band below it (each colour's swatch followed by its class value)."""
    grey = display_grey(image).astype(np.float32)[..., None].repeat(3, axis=-1)
    values = np.unique(class_map)
    colours = np.zeros(grey.shape, np.float32)
    for i, value in enumerate(values):
        colours[class_map == value] = PALETTE[i % len(PALETTE)]
    overlay = np.clip((1 - alpha) * grey + alpha * colours, 0, 255).astype(np.uint8)
    return np.concatenate([overlay, legend_band([int(v) for v in values], overlay.shape[1])])


def drawable(image: np.ndarray, class_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None, str]:
    """What a picture of a class map can show: a 2-D image and its map as they are, or a stack's
    middle slice, with that slice's z and a note for the user saying so ("" and None for 2-D).
    Every command's --pictures draws stacks this way, rather than writing nothing."""
    if class_map.ndim == 2:
        return image, class_map, None, ""
    depth = class_map.shape[0]
    z = depth // 2
    return image[z], class_map[z], z, f" (pictures of the middle slice, z = {z} of 0..{depth - 1})"


def colour_names(values: list[int]) -> str:
    """"85 red, 170 green, ..." for the classes of `class_overlay`, in its order."""
    names = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "lime", "pink")
    return ", ".join(f"{v} {names[i % len(names)]}" for i, v in enumerate(values))


DIGITS = {  # 3x5 bitmaps of the digits and the minus sign, rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    "-": ("000", "000", "111", "000", "000"),
}
LEGEND_SCALE = 2
"""Pixels per font dot: digits are 6 x 10 pixels."""


def drawn_number(value: int) -> np.ndarray:
    """A bool (10, 8 * digits) picture of an integer in the 3x5 font, scaled by LEGEND_SCALE."""
    glyphs = [np.array([[c == "1" for c in row] + [False] for row in DIGITS[ch]]) for ch in str(value)]
    return np.kron(np.hstack(glyphs), np.ones((LEGEND_SCALE, LEGEND_SCALE), bool))


def legend_band(values: list[int], width: int) -> np.ndarray:
    """An RGB uint8 band below the overlay: a swatch of each class's colour (as in class_overlay)
    followed by its value, in rows of 18 pixels, as many rows as the picture's width needs."""
    entries = [(PALETTE[i % len(PALETTE)], drawn_number(v)) for i, v in enumerate(values)]
    places, x, row = [], 4, 0
    for _, text in entries:
        size = 15 + text.shape[1]
        if x > 4 and x + size > width:
            x, row = 4, row + 1
        places.append((row, x))
        x += size + 10
    band = np.full((18 * (row + 1), width, 3), 255, np.uint8)
    for (colour, text), (row, x) in zip(entries, places):
        top = 18 * row
        band[top + 3 : top + 15, x : x + 12] = colour
        region = band[top + 4 : top + 14, x + 15 : x + 15 + text.shape[1]]
        region[text[:, : region.shape[1]]] = 0
    return band



def probability_pictures(probabilities, z: int | None = None) -> list[tuple[int, np.ndarray]]:
    """(class value, 8-bit greyscale picture) for each class of a (K, Y, X) probabilities dataset, or
    of slice `z` of a (K, Z, Y, X) one."""
    values = [int(v) for v in probabilities.attrs["class_values"]]
    plane = (lambda k: probabilities[k]) if z is None else (lambda k: probabilities[k, z])
    return [(v, (np.asarray(plane(k)) * 255).round().astype(np.uint8)) for k, v in enumerate(values)]
