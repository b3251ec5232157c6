"""The default classical bank: intensity, edges, curvature and texture at seven scales, 53 channels.

Channels, in order, for one greyscale image with sigmas (0.5, 1, 1.6, 3.5, 5, 10, 16) pixels:
  for each sigma s:
    gaussian_sS                             G_s = Gaussian(image, s)
    gradient_magnitude_sS                   |grad G_s| (3 x 3 Sobel / 8: intensity per pixel)
    hessian_eigenvalue{1,2}_sS              of the central-difference Hessian of G_s
    structure_tensor_eigenvalue{1,2}_sS     of Gaussian(2 s) of the outer product of grad G_s (texture,
                                            orientation strength: what separates textures of one mean)
  dog_sA_sB = G_A - G_B for A one of the two finest scales and every B > A (11: small structures, down to
                                            one-pixel particles, against their surroundings at every size)
Eigenvalues in descending order. Gaussians are scipy's (truncated at 4 sigma), borders mirrored (the
product of the x and y derivatives, odd under reflection, with its sign changed), so that the bank is
the same computed on the whole image or in strips. The structure tensors of sigma 10 and 16 (smoothing
20 and 32 px) are smoothed on every 4th pixel and interpolated back (cubic): within 1e-4 (relative L2)
of smoothing every pixel on micrographs, for a fifth of the bank's time.

Why these: ilastik's scales reach 10 px and Weka's blurs 6.4 px, so objects and textures larger than
that have no feature that sees them; scikit-image's 20 channels reach 16 but have no structure tensor
and no difference of Gaussians. Chosen by mIoU over the declared tuning cases of bench/cases.py
(EM slices 10-12, large objects, textures, similar phases, small particles) with a 200-tree forest of
depth 10 and with ilastik's forest; the table and the cases reported apart are in the README. Differences
of two coarse Gaussians (the other 10 of all 21 pairs) were dropped there: they repeat what the coarse
Gaussians say, and a forest drawing 7 of 63 channels per split drew them instead of informative ones.
"""

from __future__ import annotations

from itertools import combinations

import torch

from .filters import (
    centred_kernel_spectrum,
    cubic_upsampling,
    differences,
    fft_size,
    gaussian_blur_bank,
    gaussian_blur_two,
    gaussian_kernel1d,
    gaussian_radius,
    magnitude,
    mirror_parity,
    symmetric_eigenvalues,
)

MULTISCALE_SIGMAS: tuple[float, ...] = (0.5, 1.0, 1.6, 3.5, 5.0, 10.0, 16.0)
STRUCTURE_TENSOR_RATIO = 2.0
"""The structure tensor's smoothing scale over its gradient's scale."""
DECIMATION = 4
DECIMATED_FROM = 20.0
"""From this structure-tensor smoothing (pixels) on, the gradient products are smoothed on every
DECIMATION-th row and column and brought back by cubic interpolation: they vary slowly there (the
products of gradients at scale 10 are smooth over about 7 pixels), so the difference from smoothing
every pixel stays near 1e-4 (relative L2), while the FFTs shrink 16-fold."""
DOG_FINEST = 2
"""Differences of Gaussians are taken from this many of the finest scales to every coarser one."""
PER_SCALE = ("gaussian", "gradient_magnitude", "hessian_eigenvalue1", "hessian_eigenvalue2",
             "structure_tensor_eigenvalue1", "structure_tensor_eigenvalue2")


def dog_pairs(scales: int, finest: int = DOG_FINEST) -> list[tuple[int, int]]:
    """Scale indices (i, j), i < j, of the differences of Gaussians: i among the `finest` first scales."""
    return [(i, j) for i, j in combinations(range(scales), 2) if i < finest]


def multiscale_channel_names(sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> list[str]:
    """Names of the channels `multiscale_features` returns for one image channel, in order."""
    names = [f"{name}_s{s:g}" for s in sigmas for name in PER_SCALE]
    return names + [f"dog_s{sigmas[i]:g}_s{sigmas[j]:g}" for i, j in dog_pairs(len(sigmas))]


def multiscale_features(images: torch.Tensor, sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> torch.Tensor:
    """The multiscale bank of every channel of `images` (N, C, H, W) float32 -> (N, C, 53, H, W).

    The channel axis follows `multiscale_channel_names(sigmas)`; each filter writes into its slice of
    the result. All Gaussians come from one FFT of the image, two scales per inverse FFT, with one mirrored
    sample around the image for the finite differences; each scale's structure-tensor products are
    smoothed by two FFTs and their inverses (both squares in one, the cross product in the other).
    Scale by scale, so that the temporaries of one scale stay in cache.
    """
    n, c, h, w = images.shape
    scales, pairs = len(sigmas), dog_pairs(len(sigmas))
    out = images.new_empty(n, c, len(PER_SCALE) * scales + len(pairs), h, w)
    per_scale = out[:, :, : len(PER_SCALE) * scales].unflatten(2, (scales, len(PER_SCALE)))
    # Filters see the intensities less the middle of their range, added back to the Gaussians only (every
    # other channel ignores an offset): a 16-bit image using a sliver of its range keeps float32's precision.
    # The middle of min and max, not the mean: a parallel sum rounds by the thread count, an extremum never,
    # so the features are the same bits on one thread (a Dask worker) as on many (a server).
    offset = (images.amin(dim=(-2, -1), keepdim=True) + images.amax(dim=(-2, -1), keepdim=True)) / 2
    gaussians = gaussian_blur_bank(images - offset, list(sigmas), margin=1)  # (N, C, S, H + 2, W + 2)
    for k, sigma in enumerate(sigmas):
        channels = per_scale[:, :, k]
        bordered = gaussians[:, :, k]
        channels[:, :, 0] = bordered[..., 1:-1, 1:-1]
        gx, gy, xx, yy, xy = differences(bordered)
        magnitude(gx, gy, out=channels[:, :, 1])
        symmetric_eigenvalues(xx, xy, yy, channels[:, :, 2], channels[:, :, 3])
        del xx, yy, xy
        smoothing = STRUCTURE_TENSOR_RATIO * sigma
        if smoothing >= DECIMATED_FROM:
            jxx, jyy, jxy = decimated_structure_tensor(gx, gy, smoothing, DECIMATION)
        else:
            jxx, jyy = gaussian_blur_two(gx * gx, gy * gy, smoothing)
            jxy, _ = gaussian_blur_two(gx.mul_(gy), None, smoothing, odd=True)
        symmetric_eigenvalues(jxx, jxy, jyy, channels[:, :, 4], channels[:, :, 5])
    del gaussians
    first = len(PER_SCALE) * scales
    for k, (i, j) in enumerate(pairs):  # dog_si_sj, in the order of multiscale_channel_names
        torch.sub(per_scale[:, :, i, 0], per_scale[:, :, j, 0], out=out[:, :, first + k])
    per_scale[:, :, :, 0] += offset[:, :, None]
    return out


def decimated_structure_tensor(gx: torch.Tensor, gy: torch.Tensor, smoothing: float,
                               factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gx^2, gy^2 and gx gy (..., H, W) smoothed at `smoothing` pixels (gx odd across the x borders, gy
    across the y borders, as `gaussian_blur_two` extends them), computed on the samples at every `factor`-th
    row and column (from row and column 0) with the Gaussian of smoothing / factor, then interpolated."""
    h, w = gx.shape[-2:]
    coarse = smoothing / factor
    radius = gaussian_radius(coarse)
    spectra, crops, weights, signs = [], [], [], []
    for axis, length in ((-2, h), (-1, w)):
        first = -1 - radius  # coarse samples -1 .. (length - 1) // factor + 2 are interpolated from
        size = fft_size((length - 1) // factor + 4 + 2 * radius)
        index, sign = mirror_parity(length, (torch.arange(size, device=gx.device) + first) * factor)
        gx, gy = gx.index_select(axis, index), gy.index_select(axis, index)
        signs.append(sign)
        spectra.append(centred_kernel_spectrum(gaussian_kernel1d(coarse, radius), size, onesided=False).to(gx.device))
        crops.append(slice(radius, radius + (length - 1) // factor + 4))
        weights.append(cubic_upsampling(length, factor, (length - 1) // factor + 4, gx.device))
    gx.mul_(signs[1])  # odd across the x borders
    gy.mul_(signs[0][:, None])
    transfer = spectra[0][:, None] * spectra[1][None, :]
    squares = torch.fft.ifft2(torch.fft.fft2(torch.complex(gx * gx, gy * gy)).mul_(transfer))
    cross = torch.fft.ifft2(torch.fft.fft2(gx.mul_(gy).to(torch.complex64)).mul_(transfer))
    components = torch.stack([squares.real, squares.imag, cross.real], dim=-3)[..., crops[0], crops[1]]
    smoothed = weights[0] @ components @ weights[1].T
    return smoothed[..., 0, :, :], smoothed[..., 1, :, :], smoothed[..., 2, :, :]


def multiscale_halo(sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> int:
    """Rows of context one output row of `multiscale_features` depends on, each side: a multiple of
    DECIMATION, so that strips starting on multiples of DECIMATION rows (strips.py: of 256) smooth the
    decimated structure tensors on the same rows as the whole image."""
    def reach(s: float) -> int:
        smoothing = STRUCTURE_TENSOR_RATIO * s
        if smoothing >= DECIMATED_FROM:  # the coarse kernel and the interpolation's 4 samples
            return DECIMATION * (gaussian_radius(smoothing / DECIMATION) + 3)
        return gaussian_radius(smoothing)

    halo = max(gaussian_radius(s) + 1 + reach(s) for s in sigmas)
    return -(-halo // DECIMATION) * DECIMATION  # a multiple of DECIMATION: every strip samples the same rows
