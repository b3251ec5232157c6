"""The Trainable-Weka-like classical filter bank: 58 named channels per image channel.

Channels, in order, for one greyscale image with sigmas (1, 2, 4, 8, 16):
  raw, sobel_s0, hessian_{mod,trace,det,eig1,eig2}_s0                    (7, at zero scale)
  for each sigma: gaussian_sS, sobel_sS, hessian_{mod,trace,det,eig1,eig2}_sS    (7 x 5)
  dog_sA_sB = gaussian_sA - gaussian_sB for every pair A < B                (10)
  membrane_{mean,max,min,sum,std,median}                                    (6)
Gaussian blurs use sigma_eff = 0.4 * sigma pixels, as Weka does. Sobel is the gradient magnitude of
the 3x3 Sobel derivatives (divided by 8: intensity per pixel). Hessian entries are central second
differences of the blurred image; mod = sqrt(a^2 + b^2 + d^2), eig1 >= eig2. Membrane projections
summarise the responses to 30 line kernels (19 px, 6 degree steps) across orientations. Borders are
mirrored. Intensities are those of the input (8-bit images are scaled to [0, 1] upstream).
"""

from __future__ import annotations

from itertools import combinations

import torch

from .filters import derivatives, gaussian_blur_bank, line_kernels, line_responses, median_along

WEKA_SIGMAS: tuple[int, ...] = (1, 2, 4, 8, 16)
WEKA_BLUR_FACTOR = 0.4
MEMBRANE_SIZE = 19
MEMBRANE_ANGLES = 30
HESSIAN_NAMES = ("mod", "trace", "det", "eig1", "eig2")
MEMBRANE_NAMES = ("mean", "max", "min", "sum", "std", "median")


def weka_channel_names(sigmas: tuple[int, ...] = WEKA_SIGMAS) -> list[str]:
    """Names of the channels `weka_features` returns for one image channel, in order."""
    names = ["raw", "sobel_s0"] + [f"hessian_{h}_s0" for h in HESSIAN_NAMES]
    for s in sigmas:
        names += [f"gaussian_s{s}", f"sobel_s{s}"] + [f"hessian_{h}_s{s}" for h in HESSIAN_NAMES]
    names += [f"dog_s{a}_s{b}" for a, b in combinations(sigmas, 2)]
    names += [f"membrane_{m}" for m in MEMBRANE_NAMES]
    return names


def sobel_and_hessian(images: torch.Tensor) -> torch.Tensor:
    """Per channel of (N, C, H, W): Sobel magnitude and the five Hessian channels -> (N, C, 6, H, W)."""
    d = derivatives(images)
    gx, gy, a, dd, b = d.unbind(2)
    sobel = torch.sqrt(gx * gx + gy * gy)
    trace = a + dd
    root = torch.sqrt((a - dd) ** 2 / 4.0 + b * b)
    return torch.stack([
        sobel,
        torch.sqrt(a * a + b * b + dd * dd),
        trace,
        a * dd - b * b,
        trace / 2.0 + root,
        trace / 2.0 - root,
    ], dim=2)


def membrane_projections(images: torch.Tensor) -> torch.Tensor:
    """Mean, max, min, sum, std, median over the 30 line-kernel responses: (N, C, H, W) -> (N, C, 6, H, W)."""
    responses = line_responses(images, line_kernels(MEMBRANE_SIZE, MEMBRANE_ANGLES))  # (N, C, A, H, W)
    mean = responses.mean(dim=2)
    std = ((responses - mean[:, :, None]) ** 2).mean(dim=2).sqrt()  # population std, like numpy
    return torch.stack([
        mean,
        responses.amax(dim=2),
        responses.amin(dim=2),
        responses.sum(dim=2),
        std,
        median_along(responses, dim=2),
    ], dim=2)


def weka_features(images: torch.Tensor, sigmas: tuple[int, ...] = WEKA_SIGMAS) -> torch.Tensor:
    """The Weka-like bank of every channel of `images` (N, C, H, W) float32 -> (N, C, 58, H, W).

    The channel axis of the result follows `weka_channel_names(sigmas)`.
    """
    n, c, h, w = images.shape
    blurs = gaussian_blur_bank(images, [WEKA_BLUR_FACTOR * s for s in sigmas])  # (N, C, S, H, W)
    scales = torch.cat([images[:, :, None], blurs], dim=2)  # (N, C, 1 + S, H, W): raw then blurs
    edges = sobel_and_hessian(scales.reshape(n, c * (1 + len(sigmas)), h, w))
    edges = edges.view(n, c, 1 + len(sigmas), 6, h, w)
    per_scale = torch.cat([scales[:, :, :, None], edges], dim=3)  # (N, C, 1 + S, 7, H, W)
    pairs = list(combinations(range(len(sigmas)), 2))
    dogs = torch.stack([blurs[:, :, i] - blurs[:, :, j] for i, j in pairs], dim=2)
    return torch.cat([
        per_scale.reshape(n, c, -1, h, w),
        dogs,
        membrane_projections(images),
    ], dim=2)


def weka_halo(sigmas: tuple[int, ...] = WEKA_SIGMAS) -> int:
    """Rows of context one output row of `weka_features` depends on, each side."""
    from .filters import gaussian_radius

    return max(gaussian_radius(WEKA_BLUR_FACTOR * max(sigmas)) + 1, MEMBRANE_SIZE // 2)
