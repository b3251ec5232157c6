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

from .filters import (
    derivatives,
    gaussian_blur_bank,
    line_kernels,
    line_responses,
    median_along,
    symmetric_eigenvalues,
)

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


def sobel_and_hessian(images: torch.Tensor, out: torch.Tensor) -> None:
    """Per channel of (N, C, H, W): Sobel magnitude and the five Hessian channels into `out` (N, C, 6, H, W)."""
    gx, gy, a, d, b = derivatives(images).unbind(2)
    torch.hypot(gx, gy, out=out[:, :, 0])
    bb = b * b
    torch.sqrt(a * a + bb + d * d, out=out[:, :, 1])
    torch.add(a, d, out=out[:, :, 2])
    torch.sub(a * d, bb, out=out[:, :, 3])
    symmetric_eigenvalues(a, b, d, out[:, :, 4], out[:, :, 5])


def membrane_projections(images: torch.Tensor, out: torch.Tensor) -> None:
    """Mean, max, min, sum, std, median over the 30 line-kernel responses into `out` (N, C, 6, H, W)."""
    responses = line_responses(images, line_kernels(MEMBRANE_SIZE, MEMBRANE_ANGLES))  # (N, C, A, H, W)
    torch.mean(responses, dim=2, out=out[:, :, 0])
    torch.amax(responses, dim=2, out=out[:, :, 1])
    torch.amin(responses, dim=2, out=out[:, :, 2])
    torch.sum(responses, dim=2, out=out[:, :, 3])
    out[:, :, 5] = median_along(responses, dim=2)
    responses.sub_(out[:, :, 0, None]).square_()  # population std, like numpy: root mean square deviation
    torch.sqrt(responses.mean(dim=2), out=out[:, :, 4])


def weka_features(images: torch.Tensor, sigmas: tuple[int, ...] = WEKA_SIGMAS) -> torch.Tensor:
    """The Weka-like bank of every channel of `images` (N, C, H, W) float32 -> (N, C, 58, H, W).

    The channel axis of the result follows `weka_channel_names(sigmas)`. Each filter writes straight
    into its slice of the result (no concatenation copies).
    """
    n, c, h, w = images.shape
    scales = 1 + len(sigmas)
    pairs = list(combinations(range(len(sigmas)), 2))
    out = images.new_empty(n, c, 7 * scales + len(pairs) + len(MEMBRANE_NAMES), h, w)
    per_scale = out[:, :, : 7 * scales].unflatten(2, (scales, 7))  # raw then each blur, 7 channels each
    per_scale[:, :, 0, 0] = images
    per_scale[:, :, 1:, 0] = gaussian_blur_bank(images, [WEKA_BLUR_FACTOR * s for s in sigmas])
    smoothed = per_scale[:, :, :, 0]
    for k in range(scales):
        sobel_and_hessian(smoothed[:, :, k], per_scale[:, :, k, 1:])
    for k, (i, j) in enumerate(pairs):
        torch.sub(smoothed[:, :, 1 + i], smoothed[:, :, 1 + j], out=out[:, :, 7 * scales + k])
    membrane_projections(images, out[:, :, 7 * scales + len(pairs) :])
    return out


def weka_halo(sigmas: tuple[int, ...] = WEKA_SIGMAS) -> int:
    """Rows of context one output row of `weka_features` depends on, each side."""
    from .filters import gaussian_radius

    return max(gaussian_radius(WEKA_BLUR_FACTOR * max(sigmas)) + 1, MEMBRANE_SIZE // 2)
