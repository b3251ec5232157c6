"""A generated three-phase micrograph with scribbles and ground truth, for the demo (numpy only).

Dark rounded grains and small bright particles in a mid-grey matrix, with bright grain rims,
shading and noise, like the SEM images the method is used on. Scribbles are short strokes drawn
well inside each phase, about 1 % of the pixels, as a user would draw them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MATRIX, GRAIN, PARTICLE = 85, 170, 255
"""Class values of the sample, as in the shared ISB three-phase data set."""


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (Y, X) uint8
    scribbles: np.ndarray  # (Y, X) uint8: 0 unlabelled, else a class value
    truth: np.ndarray  # (Y, X) uint8 class values


def smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian smoothing by FFT (sigma in pixels)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=field.shape)


def eroded(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2 radius + 1) square, by shifting."""
    out = mask.copy()
    for _ in range(radius):
        core = out.copy()
        core[1:] &= out[:-1]
        core[:-1] &= out[1:]
        core[:, 1:] &= out[:, :-1]
        core[:, :-1] &= out[:, 1:]
        out = core
    return out


def strokes(mask: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random-walk strokes of about `length` pixels that stay inside `mask`."""
    drawn = np.zeros_like(mask)
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        return drawn
    for start in candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]:
        y, x = start
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(length):
            drawn[y, x] = True
            angle += rng.normal(0, 0.25)
            ny, nx = int(round(y + np.sin(angle))), int(round(x + np.cos(angle)))
            if not (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]):
                break
            y, x = ny, nx
    return drawn


def three_phase_sample(size: int = 384, seed: int = 7) -> Sample:
    """A reproducible size x size sample micrograph with its scribbles and ground truth."""
    rng = np.random.default_rng(seed)
    grains = smooth(rng.normal(size=(size, size)), size / 40) > 0
    speckle = smooth(rng.normal(size=(size, size)), 1.5)
    particles = (speckle > np.quantile(speckle, 0.985)) & ~grains
    truth = np.full((size, size), MATRIX, np.uint8)
    truth[grains] = GRAIN
    truth[particles] = PARTICLE
    grain_soft = smooth(grains.astype(float), 1.5)
    rim = np.clip(1.0 - np.abs(grain_soft - 0.5) * 3.0, 0, None)
    image = 0.5 - 0.3 * grain_soft + 0.45 * smooth(particles.astype(float), 0.7) + 0.12 * rim
    shading = smooth(rng.normal(size=(size, size)), size / 6)
    image += 0.08 * shading / shading.std()
    image += rng.normal(0, 0.04, size=(size, size))
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    scribbles = np.zeros((size, size), np.uint8)
    for value, count in ((MATRIX, 16), (GRAIN, 16), (PARTICLE, 12)):
        inside = eroded(truth == value, 3 if value != PARTICLE else 0)
        scribbles[strokes(inside, count, size // 12 if value != PARTICLE else 6, rng)] = value
    return Sample(image=image, scribbles=scribbles, truth=truth)
