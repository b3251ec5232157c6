"""Small torch filter primitives shared by the classical filter banks (CPU and GPU alike).

All functions take and return float32 tensors of shape (N, C, H, W) and treat image borders as
mirrored without repeating the edge sample (scipy.ndimage mode "mirror": d c b | a b c d | c b a),
for any padding width, so results match scipy channel by channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GAUSSIAN_TRUNCATE = 4.0
"""Gaussian kernels reach this many standard deviations each side (scipy.ndimage's default)."""


def mirror_indices(length: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices into a length-`length` axis padded by `pad` each side with mirror reflection."""
    index = torch.arange(-pad, length + pad, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= length, period - index, index)


def mirror_pad(x: torch.Tensor, pad_y: int, pad_x: int) -> torch.Tensor:
    """Pad the last two axes by mirror reflection; unlike F.pad alone, any width works on any size."""
    if pad_y < x.shape[-2] and pad_x < x.shape[-1]:
        return F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    if pad_y:
        x = x.index_select(-2, mirror_indices(x.shape[-2], pad_y, x.device))
    if pad_x:
        x = x.index_select(-1, mirror_indices(x.shape[-1], pad_x, x.device))
    return x


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation `sigma` (pixels) over [-radius, radius]."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_radius(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> int:
    """Kernel radius scipy.ndimage.gaussian_filter uses for `sigma` and `truncate`."""
    return int(truncate * float(sigma) + 0.5)


def centred_kernel_spectrum(kernel: torch.Tensor, length: int, onesided: bool) -> torch.Tensor:
    """Spectrum of an odd 1-D kernel centred on sample 0 of a circular axis of `length` samples."""
    radius = kernel.numel() // 2
    circular = torch.zeros(length, dtype=torch.float64)
    circular[: radius + 1] = kernel[radius:].double()
    if radius:
        circular[length - radius :] = kernel[:radius].double()
    spectrum = torch.fft.rfft(circular) if onesided else torch.fft.fft(circular)
    return spectrum.to(torch.complex64)


def odd_borders(padded: torch.Tensor, pad_y: int, pad_x: int) -> torch.Tensor:
    """Negate the mirrored borders of `padded` in place (corners twice): the extension of a quantity that
    changes sign under reflection, such as the product of the x and y derivatives."""
    for border in (padded[..., :pad_y, :], padded[..., padded.shape[-2] - pad_y :, :],
                   padded[..., :, :pad_x], padded[..., :, padded.shape[-1] - pad_x :]):
        border.neg_()
    return padded


def gaussian_blur_bank(image: torch.Tensor, sigmas: list[float], odd: bool = False) -> torch.Tensor:
    """Blur each channel of `image` (N, C, H, W) at every sigma (pixels): (N, C, S, H, W).

    One FFT of the mirror-padded image (zero-filled to a fast FFT size) serves all scales; the padding covers the widest kernel, so
    the circular convolution equals scipy's gaussian_filter(mode="mirror") up to float rounding.
    `odd`: the borders are mirrored with their sign changed (see `odd_borders`).
    """
    n, c, h, w = image.shape
    radius = max(gaussian_radius(s) for s in sigmas)
    padded = mirror_pad(image, radius, radius)
    padded = odd_borders(padded, radius, radius) if odd else padded
    padded = F.pad(padded, (0, fft_size(padded.shape[-1]) - padded.shape[-1], 0, fft_size(padded.shape[-2]) - padded.shape[-2]))
    hp, wp = padded.shape[-2:]
    spectrum = torch.fft.rfft2(padded)
    blurs = []
    for sigma in sigmas:
        blurred = torch.fft.irfft2(spectrum * gaussian_transfer(sigma, hp, wp).to(image.device), s=(hp, wp))
        blurs.append(blurred[..., radius : radius + h, radius : radius + w])
    return torch.stack(blurs, dim=2)


def fft_size(length: int) -> int:
    """The smallest length >= `length` whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    size = length
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def gaussian_transfer(sigma: float, height: int, width: int) -> torch.Tensor:
    """The (height, width // 2 + 1) rfft2 transfer function of scipy's truncated Gaussian of `sigma` pixels."""
    kernel = gaussian_kernel1d(sigma, gaussian_radius(sigma))
    return (centred_kernel_spectrum(kernel, height, onesided=False)[:, None]
            * centred_kernel_spectrum(kernel, width, onesided=True)[None, :])


def gaussian_blur_each(images: torch.Tensor, sigmas: list[float], odd: bool = False) -> torch.Tensor:
    """Blur channel k of `images` (N, K, H, W) at sigmas[k] (pixels), like scipy's gaussian_filter(mode="mirror").

    Channels of one sigma share one FFT padded for their own kernel (one padding for all would make
    every small kernel pay for the widest; direct convolution is slower than FFT from sigma 1 on a CPU).
    """
    out = torch.empty_like(images)
    for sigma in sorted(set(sigmas)):
        channels = [k for k, s in enumerate(sigmas) if s == sigma]
        out[:, channels] = gaussian_blur_bank(images[:, channels], [sigma], odd)[:, :, 0]
    return out


def symmetric_eigenvalues(xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor, larger: torch.Tensor,
                          smaller: torch.Tensor) -> None:
    """Eigenvalues of the symmetric 2 x 2 matrices [[xx, xy], [xy, yy]] into `larger` and `smaller`."""
    half_trace = (xx + yy) / 2.0
    root = torch.hypot((xx - yy) / 2.0, xy)
    torch.add(half_trace, root, out=larger)
    torch.sub(half_trace, root, out=smaller)


def derivatives(image: torch.Tensor) -> torch.Tensor:
    """Sobel and Hessian derivatives of each channel: (N, C, H, W) -> (N, C, 5, H, W).

    Along the third axis: d/dx, d/dy (3x3 Sobel divided by 8, so intensity change per pixel), then
    d2/dx2, d2/dy2 ([1, -2, 1]) and d2/dxdy ([-1, 0, 1] x [-1, 0, 1] / 4): central differences.
    """
    p = mirror_pad(image, 1, 1)
    centre = p[..., 1:-1, 1:-1]
    smooth_y = p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]  # (H, W + 2)
    smooth_x = p[..., :, :-2] + 2.0 * p[..., :, 1:-1] + p[..., :, 2:]  # (H + 2, W)
    diff_x = p[..., :, 2:] - p[..., :, :-2]  # (H + 2, W)
    return torch.stack([
        (smooth_y[..., 2:] - smooth_y[..., :-2]) / 8.0,
        (smooth_x[..., 2:, :] - smooth_x[..., :-2, :]) / 8.0,
        p[..., 1:-1, 2:] - 2.0 * centre + p[..., 1:-1, :-2],
        p[..., 2:, 1:-1] - 2.0 * centre + p[..., :-2, 1:-1],
        (diff_x[..., 2:, :] - diff_x[..., :-2, :]) / 4.0,
    ], dim=2)


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs of Batcher's odd-even merge sort for n inputs (n a power of two)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def median_network(n: int) -> list[tuple[int, int]]:
    """The comparators of a sorting network of n inputs that the middle output(s) depend on."""
    size = 1 << max(n - 1, 1).bit_length()
    needed = {(n - 1) // 2, n // 2}
    kept = []
    for i, j in reversed(sorting_network(size)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return kept[::-1]


def median_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Median along `dim` (mean of the two middle values for an even count, like numpy).

    On a CPU: elementwise min/max through a sorting network, 64 rows at a time so each tile stays
    in cache (several times faster than torch.sort over millions of short rows); on a GPU: sort.
    """
    if values.device.type != "cpu":
        ordered = torch.sort(values, dim=dim).values
        n = values.shape[dim]
        return (ordered.select(dim, (n - 1) // 2) + ordered.select(dim, n // 2)) / 2.0
    rows_per_tile = 64
    values = values.movedim(dim, 0)
    n = values.shape[0]
    size = 1 << max(n - 1, 1).bit_length()
    network = median_network(n)
    flat = values.reshape(n, -1, values.shape[-1]) if values.dim() > 1 else values.reshape(n, 1, 1)
    out = torch.empty(flat.shape[1:], dtype=values.dtype, device=values.device)
    for r0 in range(0, flat.shape[1], rows_per_tile):
        tile = list(flat[:, r0 : r0 + rows_per_tile].unbind(0))
        tile += [torch.full_like(tile[0], float("inf"))] * (size - n)
        for i, j in network:
            tile[i], tile[j] = torch.minimum(tile[i], tile[j]), torch.maximum(tile[i], tile[j])
        out[r0 : r0 + rows_per_tile] = (tile[(n - 1) // 2] + tile[n // 2]) / 2.0
    return out.reshape(values.shape[1:])


def line_kernels(size: int = 19, angles: int = 30) -> torch.Tensor:
    """One-pixel-wide digital lines of length `size` through the centre, at `angles` orientations.

    Orientation k is k * 180 / angles degrees from vertical. Each line has exactly one pixel per step
    along its major axis and keeps the pixels within size / 2 of the centre, so every orientation has
    the same physical length. Returns (angles, 1, size, size) float32 of zeros and ones; each kernel is
    symmetric under a half turn, so convolution and correlation agree.
    """
    half = size // 2
    kernels = torch.zeros(angles, 1, size, size)
    steps = torch.arange(-half, half + 1, dtype=torch.float64)
    for k in range(angles):
        theta = math.radians(k * 180.0 / angles)
        dy, dx = math.cos(theta), math.sin(theta)  # unit direction, theta = 0 is vertical
        if abs(dy) >= abs(dx):
            rows = steps
            cols = torch.round(steps * dx / dy)
        else:
            cols = steps
            rows = torch.round(steps * dy / dx)
        keep = rows**2 + cols**2 <= (size / 2.0) ** 2
        kernels[k, 0, (rows[keep] + half).long(), (cols[keep] + half).long()] = 1.0
    return kernels


def line_responses(image: torch.Tensor, kernels: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Correlate each channel of `image` (N, C, H, W) with every 0/1 line kernel: (N, C, A, H, W).

    method "convolution" (the "auto" choice on a GPU): one dense convolution. Method "taps" ("auto"
    on a CPU): the kernels' few taps (about 17 of 361) summed as shifted views, 128 rows at a time so
    the tile stays in cache; about 3x faster than the dense convolution on a CPU.
    """
    n, c, h, w = image.shape
    a, _, size, _ = kernels.shape
    half = size // 2
    padded = mirror_pad(image, half, half)
    if method == "auto":
        method = "taps" if image.device.type == "cpu" else "convolution"
    if method == "convolution":
        out = F.conv2d(padded.reshape(n * c, 1, h + 2 * half, w + 2 * half), kernels.to(image.device))
        return out.view(n, c, a, h, w)
    taps = [torch.nonzero(kernel[0]).tolist() for kernel in kernels]
    out = image.new_empty(n, c, a, h, w)
    rows = 128
    for y0 in range(0, h, rows):
        t = min(rows, h - y0)
        tile = padded[..., y0 : y0 + t + 2 * half, :]
        for k, kernel_taps in enumerate(taps):
            total = out[:, :, k, y0 : y0 + t]
            (dy, dx), rest = kernel_taps[0], kernel_taps[1:]
            total.copy_(tile[..., dy : dy + t, dx : dx + w])
            for dy, dx in rest:
                total.add_(tile[..., dy : dy + t, dx : dx + w])
    return out
