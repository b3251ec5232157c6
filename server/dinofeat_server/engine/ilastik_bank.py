"""ilastik's Pixel Classification feature bank (all 37 features selected): 49 channels per image channel.

Computed as ilastik 1.4 computes it with fastfilters (lazyflow/operators/opPixelFeaturesPresmoothed.py,
filterOperators.py; fastfilters src/library/fir_kernel.c, fir_filters.c, linalg.c, src/python/core.cxx).
For each scale s of (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0) pixels:
  presmoothing   P_s = Gaussian(image, t) with t = sqrt(s^2 - 1) if s > 1 else t = s, window 3.5, then
                 every feature of scale s is computed from P_s at s' = min(s, 1) with window 2. So s > 1 gives
                 an effective sigma of s, while s <= 1 is smoothed twice (effective s * sqrt(2); 0.3: ~0.42).
Channels, in ilastik's order (feature type, then scale; Gaussian smoothing at all 7 scales, the others at
the 6 scales >= 0.7, as ilastik's feature table allows):
  gaussian_smoothing_sS                     (7)  G(s') * P_s
  laplacian_of_gaussian_sS                  (6)  Gxx(s') + Gyy(s') on P_s
  gaussian_gradient_magnitude_sS            (6)  sqrt(Gx(s')^2 + Gy(s')^2) on P_s
  difference_of_gaussians_sS                (6)  G(s') - G(0.66 s') on P_s (wider minus narrower)
  structure_tensor_eigenvalue{1,2}_sS      (12)  gradient at 0.5 s', products smoothed at s' (fastfilters
                                                 swaps ilastik's innerScale=s' / outerScale=0.5 s' into this)
  hessian_of_gaussian_eigenvalue{1,2}_sS   (12)  of [[Gxx, Gxy], [Gxy, Gyy]](s') on P_s
Eigenvalues in descending order (eigenvalue1 >= eigenvalue2), as fastfilters returns them.

Kernels are fastfilters' sampled FIR kernels (not scipy's): radius floor(window * sigma + 0.5); Gaussian
normalised to sum 1; first derivative x g(x) scaled so that sum k(x) x = 1; second derivative
(x^2 / sigma^2 - 1) g(x) minus its mean, scaled so that sum k(x) x^2 = 2. Separable, float32, x then y.

Borders: mirrored without repeating the edge sample (d c b | a b c d | c b a), as fastfilters does, at
every stage. One deliberate difference: the structure tensor's off-diagonal product Gx * Gy is odd about
the border, and it is extended as odd (sign-flipped mirror) before smoothing, where fastfilters mirrors it
plainly. So the bank equals the whole computation on the infinitely mirrored input, and computing in strips
with `ilastik_halo()` rows of (mirrored) context equals the whole image exactly; it differs from ilastik
only in the two structure-tensor channels per scale, within two pixels of the border. Images smaller than
a kernel are mirrored periodically (ilastik refuses scales with ceil(3.5 s) + 1 > the image side).

Intensities enter unscaled (ilastik filters the raw values as float32). Every channel is positively
homogeneous of degree 1 in the intensities except the structure tensor eigenvalues, which are quadratic:
on intensities scaled by a (e.g. a = 1/255 for 8-bit images scaled to [0, 1]) they are a^2 times ilastik's.

ilastik flattens several input channels feature-major (for each feature: each input channel, then its
eigenvalues); `ilastik_features` keeps the input channel axis apart, (N, C, 49, H, W).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .filters import mirror_pad, symmetric_eigenvalues

ILASTIK_SCALES: tuple[float, ...] = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
"""ilastik's default scales (pixels): ilastik/applets/featureSelection/opFeatureSelection.py defaultScales."""
PRESMOOTH_WINDOW = 3.5
"""Kernel radius / sigma of the presmoothing (OpPixelFeaturesPresmoothed.WINDOW_SIZE)."""
FEATURE_WINDOW = 2.0
"""Kernel radius / sigma of every feature filter (OpBaseFilter.window_size_feature)."""
MAX_FEATURE_SCALE = 1.0
"""Scales above this are presmoothed to sqrt(s^2 - 1) and filtered at this scale."""
EDGE_MINIMUM_SCALE = 0.7
"""All features but Gaussian smoothing start at this scale (OpBaseFilter.minimum_scale)."""
DOG_RATIO = 0.66
STRUCTURE_TENSOR_RATIO = 0.5
FEATURE_NAMES = (
    ("gaussian_smoothing",),
    ("laplacian_of_gaussian",),
    ("gaussian_gradient_magnitude",),
    ("difference_of_gaussians",),
    ("structure_tensor_eigenvalue1", "structure_tensor_eigenvalue2"),
    ("hessian_of_gaussian_eigenvalue1", "hessian_of_gaussian_eigenvalue2"),
)
"""Channel names per feature type, in ilastik's FeatureIds order (GaussianSmoothing, ...)."""


def _feature_scales(feature: int) -> tuple[float, ...]:
    """The scales at which feature type `feature` (an index into FEATURE_NAMES) is computed."""
    return ILASTIK_SCALES if feature == 0 else tuple(s for s in ILASTIK_SCALES if s >= EDGE_MINIMUM_SCALE)


def ilastik_channel_names() -> list[str]:
    """Names of the 49 channels `ilastik_features` returns for one image channel, in order."""
    return [f"{name}_s{s}" for f, names in enumerate(FEATURE_NAMES) for s in _feature_scales(f) for name in names]


def _radius(sigma: float, window: float) -> int:
    """fastfilters' kernel radius: floor(window * sigma + 0.5) (fir_kernel.c)."""
    return math.floor(window * sigma + 0.5)


@functools.cache
def _kernel(order: int, sigma: float, window: float) -> tuple[float, ...]:
    """fastfilters' Gaussian (order 0), first or second derivative FIR kernel over [-r, r], for correlation."""
    r = _radius(sigma, window)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    if order == 0:
        k = g / g.sum()
    elif order == 1:
        k = x * g
        k = k / (k * x).sum()
    else:
        k = (x * x / sigma**2 - 1.0) * g
        k = k - k.mean()
        k = 2.0 * k / (k * x * x).sum()
    return tuple(k.to(torch.float32).tolist())


def _pad(x: torch.Tensor, r: int, dim: int, odd: bool) -> torch.Tensor:
    """Mirror-pad axis `dim` (-1 or -2) by `r`; `odd` flips the sign of the mirrored samples."""
    p = mirror_pad(x, r, 0) if dim == -2 else mirror_pad(x, 0, r)
    n = x.shape[dim]
    if odd and n > 1:
        index = torch.arange(-r, n + r, device=x.device)
        reflected = torch.remainder(index, 2 * (n - 1)) >= n  # mirrored an odd number of times
        flip = torch.where(reflected, -1.0, 1.0).to(x.dtype)
        p = p * (flip if dim == -1 else flip[:, None])
    return p


def _correlate(x: torch.Tensor, kernels: list[tuple[float, ...]], dim: int, odd: bool = False) -> list[torch.Tensor]:
    """Correlate `x` along `dim` with each odd-length symmetric or antisymmetric kernel, sharing one padding.

    Taps are folded as fastfilters does: k0 x[i] + sum_j kj (x[i + j] +- x[i - j]).
    """
    r = max(len(k) for k in kernels) // 2
    n = x.shape[dim]
    p = _pad(x, r, dim, odd)
    centre = p.narrow(dim, r, n)
    outs = [centre * k[len(k) // 2] for k in kernels]
    for j in range(1, r + 1):
        right, left = p.narrow(dim, r + j, n), p.narrow(dim, r - j, n)
        total = difference = None
        for k, out in zip(kernels, outs, strict=True):
            h = len(k) // 2
            if j > h:
                continue
            if k[h + j] == k[h - j]:  # Gaussian or second derivative (exactly symmetric by construction)
                total = right + left if total is None else total
                out.add_(total, alpha=k[h + j])
            else:  # first derivative
                difference = right - left if difference is None else difference
                out.add_(difference, alpha=k[h + j])
    return outs


def _blur(x: torch.Tensor, sigma: float, window: float, odd: bool = False) -> torch.Tensor:
    """Separable fastfilters Gaussian smoothing (x, then y)."""
    g = [_kernel(0, sigma, window)]
    return _correlate(_correlate(x, g, -1, odd)[0], g, -2, odd)[0]


def _features_at(p: torch.Tensor, sigma: float, at: Callable[[str], torch.Tensor]) -> None:
    """All six feature types of presmoothed images `p` (B, 1, H, W) at feature scale `sigma`.

    `at(name)` is the (B, 1, H, W) view of the output channel `name` (without its scale suffix).
    """
    g, d1, d2 = (_kernel(order, sigma, FEATURE_WINDOW) for order in (0, 1, 2))
    yg, yd1, yd2 = _correlate(p, [g, d1, d2], -2)
    smooth, gx, hxx = _correlate(yg, [g, d1, d2], -1)
    del yg
    gy, hxy = _correlate(yd1, [g, d1], -1)
    del yd1
    (hyy,) = _correlate(yd2, [g], -1)
    del yd2
    at("gaussian_smoothing").copy_(smooth)
    del smooth
    torch.sub(at("gaussian_smoothing"), _blur(p, DOG_RATIO * sigma, FEATURE_WINDOW), out=at("difference_of_gaussians"))
    torch.add(hxx, hyy, out=at("laplacian_of_gaussian"))
    torch.hypot(gx, gy, out=at("gaussian_gradient_magnitude"))
    del gx, gy
    symmetric_eigenvalues(hxx, hxy, hyy, at("hessian_of_gaussian_eigenvalue1"), at("hessian_of_gaussian_eigenvalue2"))
    del hxx, hxy, hyy
    inner = STRUCTURE_TENSOR_RATIO * sigma  # the gradient's scale; sigma is the tensor's smoothing
    gi, di = _kernel(0, inner, FEATURE_WINDOW), _kernel(1, inner, FEATURE_WINDOW)
    yg, yd = _correlate(p, [gi, di], -2)
    (gx,) = _correlate(yg, [di], -1)
    (gy,) = _correlate(yd, [gi], -1)
    del yg, yd
    txy = _blur(gx * gy, sigma, FEATURE_WINDOW, odd=True)
    txx = _blur(gx.square_(), sigma, FEATURE_WINDOW)
    tyy = _blur(gy.square_(), sigma, FEATURE_WINDOW)
    symmetric_eigenvalues(txx, txy, tyy, at("structure_tensor_eigenvalue1"), at("structure_tensor_eigenvalue2"))


def _presmoothing_sigma(scale: float) -> float:
    """OpPixelFeaturesPresmoothed: sqrt(s^2 - 1) above scale 1, else s itself."""
    return math.sqrt(scale**2 - 1.0) if scale > MAX_FEATURE_SCALE else scale


def _channel_views(flat: torch.Tensor, names: list[str], scale: float) -> Callable[[str], torch.Tensor]:
    """at(name): the (B, 1, H, W) view of channel f"{name}_s{scale}" of `flat` (B, 49, H, W)."""

    def at(name: str) -> torch.Tensor:
        k = names.index(f"{name}_s{scale}")
        return flat[:, k : k + 1]

    return at


def ilastik_features(images: torch.Tensor) -> torch.Tensor:
    """ilastik's 37-feature bank of every channel of `images` (N, C, H, W) float32 -> (N, C, 49, H, W).

    The channel axis of the result follows `ilastik_channel_names()`. Intensities are used as given
    (ilastik uses raw values; see the module docstring for scaling). Same code on CPU and GPU.
    """
    n, c, h, w = images.shape
    names = ilastik_channel_names()
    out = images.new_empty(n, c, len(names), h, w)
    flat = out.view(n * c, len(names), h, w)
    x = images.reshape(n * c, 1, h, w)
    for scale in ILASTIK_SCALES:
        p = _blur(x, _presmoothing_sigma(scale), PRESMOOTH_WINDOW)
        at = _channel_views(flat, names, scale)
        sigma = min(scale, MAX_FEATURE_SCALE)
        if scale >= EDGE_MINIMUM_SCALE:
            _features_at(p, sigma, at)
        else:  # only Gaussian smoothing below 0.7
            at("gaussian_smoothing").copy_(_blur(p, sigma, FEATURE_WINDOW))
    return out


def ilastik_halo() -> int:
    """Rows of context one output row of `ilastik_features` depends on, each side (38)."""
    halo = 0
    for s in ILASTIK_SCALES:
        sigma = min(s, MAX_FEATURE_SCALE)
        filters = _radius(sigma, FEATURE_WINDOW)
        if s >= EDGE_MINIMUM_SCALE:
            filters = max(filters, _radius(STRUCTURE_TENSOR_RATIO * sigma, FEATURE_WINDOW) + filters)
        halo = max(halo, _radius(_presmoothing_sigma(s), PRESMOOTH_WINDOW) + filters)
    return halo
