"""The default classical bank: intensity, edges, curvature and texture at seven scales, 63 channels.

Channels, in order, for one greyscale image with sigmas (0.5, 1, 1.6, 3.5, 5, 10, 16) pixels:
  for each sigma s:
    gaussian_sS                             G_s = Gaussian(image, s)
    gradient_magnitude_sS                   |grad G_s| (3 x 3 Sobel / 8: intensity per pixel)
    hessian_eigenvalue{1,2}_sS              of the central-difference Hessian of G_s
    structure_tensor_eigenvalue{1,2}_sS     of Gaussian(2 s) of the outer product of grad G_s (texture,
                                            orientation strength: what separates textures of one mean)
  dog_sA_sB = G_A - G_B for every pair A < B (21: blobs and rings of every size, e.g. one-pixel particles)
Eigenvalues in descending order. Gaussians are scipy's (truncated at 4 sigma), borders mirrored (the
product of the x and y derivatives, odd under reflection, with its sign changed), so that the bank is
the same computed on the whole image or in strips.

Why these: ilastik's scales reach 10 px and Weka's blurs 6.4 px, so objects and textures larger than
that have no feature that sees them; scikit-image's 20 channels reach 16 but have no structure tensor
and no difference of Gaussians. Chosen by mIoU over the declared tuning cases of bench/cases.py
(EM slices 10-12, large objects, textures, similar phases, small particles) with a 200-tree forest of
depth 10; the table and the cases reported apart are in the README.
"""

from __future__ import annotations

from itertools import combinations

import torch

from .filters import derivatives, gaussian_blur_bank, gaussian_blur_each, gaussian_radius, symmetric_eigenvalues

MULTISCALE_SIGMAS: tuple[float, ...] = (0.5, 1.0, 1.6, 3.5, 5.0, 10.0, 16.0)
STRUCTURE_TENSOR_RATIO = 2.0
"""The structure tensor's smoothing scale over its gradient's scale."""
PER_SCALE = ("gaussian", "gradient_magnitude", "hessian_eigenvalue1", "hessian_eigenvalue2",
             "structure_tensor_eigenvalue1", "structure_tensor_eigenvalue2")


def multiscale_channel_names(sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> list[str]:
    """Names of the channels `multiscale_features` returns for one image channel, in order."""
    names = [f"{name}_s{s:g}" for s in sigmas for name in PER_SCALE]
    return names + [f"dog_s{a:g}_s{b:g}" for a, b in combinations(sigmas, 2)]


def multiscale_features(images: torch.Tensor, sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> torch.Tensor:
    """The multiscale bank of every channel of `images` (N, C, H, W) float32 -> (N, C, 63, H, W).

    The channel axis follows `multiscale_channel_names(sigmas)`; each filter writes into its slice of
    the result. Structure-tensor products are smoothed by FFT: per scale, one for both squares, one for the cross product.
    """
    n, c, h, w = images.shape
    scales, pairs = len(sigmas), list(combinations(range(len(sigmas)), 2))
    out = images.new_empty(n, c, len(PER_SCALE) * scales + len(pairs), h, w)
    per_scale = out[:, :, : len(PER_SCALE) * scales].unflatten(2, (scales, len(PER_SCALE)))
    # Filters see the intensities less their mean, added back to the Gaussians only (every other channel
    # ignores an offset): a 16-bit image using a sliver of its range keeps float32's precision.
    offset = images.mean(dim=(-2, -1), keepdim=True)
    per_scale[:, :, :, 0] = gaussian_blur_bank(images - offset, list(sigmas))
    products = images.new_empty(n * c, scales, 3, h, w)  # gx^2, gy^2, gx gy of each scale
    for k in range(scales):
        gx, gy, xx, yy, xy = derivatives(per_scale[:, :, k, 0]).unbind(2)
        torch.hypot(gx, gy, out=per_scale[:, :, k, 1])
        symmetric_eigenvalues(xx, xy, yy, per_scale[:, :, k, 2], per_scale[:, :, k, 3])
        gx, gy = gx.reshape(n * c, h, w), gy.reshape(n * c, h, w)
        torch.mul(gx, gx, out=products[:, k, 0])
        torch.mul(gy, gy, out=products[:, k, 1])
        torch.mul(gx, gy, out=products[:, k, 2])
    smoothing = [STRUCTURE_TENSOR_RATIO * s for s in sigmas]
    tensor = torch.empty_like(products).view(n, c, scales, 3, h, w)
    tensor[:, :, :, :2] = gaussian_blur_each(products[:, :, :2].reshape(n * c, scales * 2, h, w),
                                             [s for s in smoothing for _ in range(2)]).view(n, c, scales, 2, h, w)
    tensor[:, :, :, 2] = gaussian_blur_each(products[:, :, 2], smoothing, odd=True).view(n, c, scales, h, w)
    del products
    symmetric_eigenvalues(tensor[:, :, :, 0], tensor[:, :, :, 2], tensor[:, :, :, 1], per_scale[:, :, :, 4], per_scale[:, :, :, 5])
    del tensor
    for k, (i, j) in enumerate(pairs):
        torch.sub(per_scale[:, :, i, 0], per_scale[:, :, j, 0], out=out[:, :, len(PER_SCALE) * scales + k])
    per_scale[:, :, :, 0] += offset[:, :, None]
    return out


def multiscale_halo(sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> int:
    """Rows of context one output row of `multiscale_features` depends on, each side."""
    return max(gaussian_radius(s) + 1 + gaussian_radius(STRUCTURE_TENSOR_RATIO * s) for s in sigmas)
