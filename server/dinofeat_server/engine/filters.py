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


def mirror_indices(length: int, pad: int, device: torch.device, after: int | None = None) -> torch.Tensor:
    """Indices into a length-`length` axis padded by `pad` before and `after` (default `pad`) after, with
    mirror reflection."""
    index = torch.arange(-pad, length + (pad if after is None else after), device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= length, period - index, index)


def mirror_pad(x: torch.Tensor, pad_y: int, pad_x: int) -> torch.Tensor:
    """Pad the last two axes by mirror reflection; unlike F.pad alone, any width works on any size."""
    return mirror_pad_sides(x, pad_y, pad_y, pad_x, pad_x)


def mirror_pad_sides(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """`mirror_pad` with its own width on each side of the last two axes."""
    if max(top, bottom) < x.shape[-2] and max(left, right) < x.shape[-1]:
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    if top or bottom:
        x = x.index_select(-2, mirror_indices(x.shape[-2], top, x.device, bottom))
    if left or right:
        x = x.index_select(-1, mirror_indices(x.shape[-1], left, x.device, right))
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


def odd_borders(padded: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Negate in place every sample of `padded` outside the (height, width) image at (top, left) (corners
    twice): the extension of a quantity that changes sign under reflection, such as the product of the x
    and y derivatives."""
    for border in (padded[..., :top, :], padded[..., top + height :, :], padded[..., :, :left], padded[..., :, left + width :]):
        border.neg_()
    return padded


def padded_for_fft(image: torch.Tensor, radius: int, odd: bool = False) -> torch.Tensor:
    """`image` (..., H, W) mirrored by `radius` samples each side and on to a fast FFT size (bottom and
    right). A circular convolution of radius at most `radius` on it equals the mirrored one on the window
    [radius, radius + H) x [radius, radius + W): the samples beyond the padding are never reached from
    there (they are mirrored too, rather than zeros, only to save a fill). `odd`: the samples outside the
    image change sign (see `odd_borders`)."""
    h, w = image.shape[-2:]
    hp, wp = fft_size(h + 2 * radius), fft_size(w + 2 * radius)
    padded = mirror_pad_sides(image, radius, hp - h - radius, radius, wp - w - radius)
    return odd_borders(padded, radius, radius, h, w) if odd else padded


def gaussian_spectrum(sigma: float, length: int, device: torch.device, dtype: type = float) -> torch.Tensor:
    """The DFT over a circular axis of `length` samples of scipy's truncated Gaussian of `sigma` pixels centred
    on sample 0: real, the kernel being symmetric; float32, or complex64 with `dtype` complex (cheaper to
    multiply a spectrum by)."""
    kernel = gaussian_kernel1d(sigma, gaussian_radius(sigma))
    spectrum = centred_kernel_spectrum(kernel, length, onesided=False)
    return (spectrum.real.contiguous() if dtype is float else spectrum.real.to(torch.complex64)).to(device)


def gaussian_blur_bank(image: torch.Tensor, sigmas: list[float], odd: bool = False, margin: int = 0) -> torch.Tensor:
    """Blur each channel of `image` (N, C, H, W) at every sigma (pixels): (N, C, S, H + 2 margin, W + 2 margin).

    One FFT of the mirror-padded image serves all scales, and each inverse FFT two of them: a Gaussian's
    spectrum is real and even, so spectrum x (G_a + i G_b) transforms back to blur_a + i blur_b exactly
    (complex FFTs: torch's real-to-complex pair costs about twice as much on a CPU). The padding covers the
    widest kernel, so the circular convolution equals scipy's gaussian_filter(mode="mirror") up to float
    rounding. `margin`: that many mirrored samples around the image too (what finite differences need).
    `odd`: the borders are mirrored with their sign changed (see `odd_borders`).
    """
    n, c, h, w = image.shape
    radius = max(gaussian_radius(s) for s in sigmas) + margin
    spectrum = torch.fft.fft2(padded_for_fft(image, radius, odd).to(torch.complex64))
    hp, wp = spectrum.shape[-2:]
    out = image.new_empty(n, c, len(sigmas), h + 2 * margin, w + 2 * margin)
    rows, columns = slice(radius - margin, radius + h + margin), slice(radius - margin, radius + w + margin)
    for k in range(0, len(sigmas), 2):
        pair = sigmas[k : k + 2]
        transfers = [gaussian_spectrum(s, hp, image.device)[:, None] * gaussian_spectrum(s, wp, image.device)[None, :] for s in pair]
        transfer = torch.complex(transfers[0], transfers[1]) if len(pair) == 2 else transfers[0]
        blurred = torch.fft.ifft2(spectrum * transfer)[..., rows, columns]
        out[:, :, k] = blurred.real
        if len(pair) == 2:
            out[:, :, k + 1] = blurred.imag
    return out


def gaussian_blur_two(first: torch.Tensor, second: torch.Tensor | None, sigma: float,
                      odd: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`first` and `second` (..., H, W) blurred at one sigma like `gaussian_blur_bank`, with one complex FFT
    and one inverse for both: `first` the real part, `second` (or nothing) the imaginary part."""
    h, w = first.shape[-2:]
    radius = gaussian_radius(sigma)
    padded = padded_for_fft(first, radius, odd)
    padded = padded.to(torch.complex64) if second is None else torch.complex(padded, padded_for_fft(second, radius, odd))
    spectrum = torch.fft.fft2(padded)
    del padded
    hp, wp = spectrum.shape[-2:]
    spectrum.mul_(gaussian_spectrum(sigma, hp, first.device, complex)[:, None]).mul_(gaussian_spectrum(sigma, wp, first.device, complex))
    blurred = torch.fft.ifft2(spectrum)[..., radius : radius + h, radius : radius + w]
    return blurred.real, (blurred.imag if second is not None else None)


def mirror_parity(length: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `positions` on an axis of `length` samples mirrored without repeating the edge (as `mirror_pad`)
    read from, and the sign (float32 +1 or -1) of a quantity odd under each reflection there."""
    if length == 1:
        return torch.zeros_like(positions), torch.ones(positions.shape, device=positions.device)
    period = 2 * (length - 1)
    index = torch.remainder(positions, period)
    reflected = index >= length
    return torch.where(reflected, period - index, index), torch.where(reflected, -1.0, 1.0)


def cubic_upsampling(length: int, factor: int, count: int, device: torch.device) -> torch.Tensor:
    """(length, count) float32 matrix taking samples at positions factor * (j - 1), j < count, to every
    position 0 .. length - 1 by cubic convolution (Keys, a = -0.5: exact for quadratics). Needs
    count >= (length - 1) // factor + 4."""
    position = torch.arange(length, dtype=torch.float64) / factor
    below = torch.floor(position)
    t = position - below
    matrix = torch.zeros(length, count, dtype=torch.float64)
    rows = torch.arange(length)
    for tap in (-1, 0, 1, 2):
        x = (t - tap).abs()
        weight = torch.where(x <= 1, (1.5 * x - 2.5) * x * x + 1, ((-0.5 * x + 2.5) * x - 4) * x + 2)
        matrix[rows, (below + tap + 1).long()] += weight
    return matrix.to(torch.float32).to(device)


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


def symmetric_eigenvalues(xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor, larger: torch.Tensor,
                          smaller: torch.Tensor) -> None:
    """Eigenvalues of the symmetric 2 x 2 matrices [[xx, xy], [xy, yy]] into `larger` and `smaller`."""
    half_trace = torch.add(xx, yy).mul_(0.5)
    half_difference = torch.sub(xx, yy)
    root = torch.addcmul(xy * xy, half_difference, half_difference, value=0.25).sqrt_()  # cheaper than torch.hypot
    torch.add(half_trace, root, out=larger)
    torch.sub(half_trace, root, out=smaller)


def magnitude(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sqrt(x^2 + y^2) into `out` (what torch.hypot computes, about twice as fast on a CPU)."""
    return torch.sqrt(torch.addcmul(x * x, y, y), out=out)


def derivatives(image: torch.Tensor) -> torch.Tensor:
    """Sobel and Hessian derivatives of each channel: (N, C, H, W) -> (N, C, 5, H, W).

    Along the third axis: d/dx, d/dy (3x3 Sobel divided by 8, so intensity change per pixel), then
    d2/dx2, d2/dy2 ([1, -2, 1]) and d2/dxdy ([-1, 0, 1] x [-1, 0, 1] / 4): central differences.
    """
    return torch.stack(differences(mirror_pad(image, 1, 1)), dim=2)


def differences(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`derivatives` of the (..., H, W) image whose one-sample mirrored border `p` (..., H + 2, W + 2) is:
    d/dx, d/dy, d2/dx2, d2/dy2 and d2/dxdy, each (..., H, W)."""
    centre = p[..., 1:-1, 1:-1]
    diff_x = p[..., :, 2:] - p[..., :, :-2]  # (H + 2, W)
    diff_y = p[..., 2:, :] - p[..., :-2, :]  # (H, W + 2)
    gx = torch.add(diff_x[..., :-2, :], diff_x[..., 2:, :]).add_(diff_x[..., 1:-1, :], alpha=2.0).mul_(0.125)
    gy = torch.add(diff_y[..., :-2], diff_y[..., 2:]).add_(diff_y[..., 1:-1], alpha=2.0).mul_(0.125)
    xx = torch.add(p[..., 1:-1, 2:], p[..., 1:-1, :-2]).sub_(centre, alpha=2.0)
    yy = torch.add(p[..., 2:, 1:-1], p[..., :-2, 1:-1]).sub_(centre, alpha=2.0)
    xy = torch.sub(diff_x[..., 2:, :], diff_x[..., :-2, :]).mul_(0.25)
    return gx, gy, xx, yy, xy


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
