"""The default `multiscale` bank equals an independent scipy/numpy computation of its definitions,
is the same in strips as on the whole image, and survives images smaller than its reach."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from dinofeat_server.engine.filters import (
    differences,
    gaussian_blur_bank,
    gaussian_blur_two,
)
from dinofeat_server.engine.multiscale_bank import (
    DECIMATED_FROM,
    DECIMATION,
    MULTISCALE_SIGMAS,
    STRUCTURE_TENSOR_RATIO,
    decimated_structure_tensor,
    multiscale_channel_names,
    multiscale_features,
    multiscale_halo,
)
from dinofeat_server.engine.stacks import FEATURE_SETS
from dinofeat_server.engine.strips import feature_strips
from scipy import ndimage as ndi


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).random((96, 120)).astype(np.float32)


@pytest.fixture(scope="module")
def bank(image) -> dict[str, np.ndarray]:
    out = multiscale_features(torch.from_numpy(image)[None, None])[0, 0].numpy()
    return dict(zip(multiscale_channel_names(), out))


def blur(image: np.ndarray, sigma: float, odd: bool = False) -> np.ndarray:
    """scipy's Gaussian with mirrored borders; `odd`: the mirrored samples change sign (padded by hand)."""
    if not odd:
        return ndi.gaussian_filter(image.astype(np.float64), sigma, mode="mirror", truncate=4.0)
    r = int(4.0 * sigma + 0.5)
    h, w = image.shape
    rows = np.abs(np.arange(-r, h + r))
    rows = np.where(rows >= h, 2 * (h - 1) - rows, rows)
    cols = np.abs(np.arange(-r, w + r))
    cols = np.where(cols >= w, 2 * (w - 1) - cols, cols)
    sign_y = np.where((np.arange(-r, h + r) < 0) | (np.arange(-r, h + r) >= h), -1.0, 1.0)
    sign_x = np.where((np.arange(-r, w + r) < 0) | (np.arange(-r, w + r) >= w), -1.0, 1.0)
    padded = image.astype(np.float64)[np.ix_(rows, cols)] * sign_y[:, None] * sign_x[None, :]
    return ndi.gaussian_filter(padded, sigma, mode="constant", truncate=4.0)[r : r + h, r : r + w]


def reference(image: np.ndarray, s: float) -> dict[str, np.ndarray]:
    """The per-scale channels of the module docstring, from scipy."""
    g = blur(image, s)
    gx = ndi.sobel(g, axis=1, mode="mirror") / 8
    gy = ndi.sobel(g, axis=0, mode="mirror") / 8
    xx = ndi.correlate1d(g, [1, -2, 1], axis=1, mode="mirror")
    yy = ndi.correlate1d(g, [1, -2, 1], axis=0, mode="mirror")
    xy = ndi.correlate1d(ndi.correlate1d(g, [-0.5, 0, 0.5], axis=0, mode="mirror"), [-0.5, 0, 0.5], axis=1, mode="mirror")
    hessian = np.linalg.eigvalsh(np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -2))
    jxx, jyy, jxy = blur(gx * gx, 2 * s), blur(gy * gy, 2 * s), blur(gx * gy, 2 * s, odd=True)
    tensor = np.linalg.eigvalsh(np.stack([np.stack([jxx, jxy], -1), np.stack([jxy, jyy], -1)], -2))
    return {"gaussian": g, "gradient_magnitude": np.hypot(gx, gy), "hessian_eigenvalue1": hessian[..., 1],
            "hessian_eigenvalue2": hessian[..., 0], "structure_tensor_eigenvalue1": tensor[..., 1],
            "structure_tensor_eigenvalue2": tensor[..., 0]}


def test_greyscale_bank_has_53_named_channels_in_documented_order():
    names = multiscale_channel_names()
    assert len(names) == 53 == FEATURE_SETS["multiscale"].channel_names(1).__len__()
    assert names[:6] == ["gaussian_s0.5", "gradient_magnitude_s0.5", "hessian_eigenvalue1_s0.5", "hessian_eigenvalue2_s0.5",
                         "structure_tensor_eigenvalue1_s0.5", "structure_tensor_eigenvalue2_s0.5"]
    assert names[42:44] == ["dog_s0.5_s1", "dog_s0.5_s1.6"] and names[48] == "dog_s1_s1.6" and names[-1] == "dog_s1_s16"


@pytest.mark.parametrize("sigma", MULTISCALE_SIGMAS)
def test_every_per_scale_channel_equals_scipy(bank, image, sigma):
    for name, expected in reference(image, sigma).items():
        got = bank[f"{name}_s{sigma:g}"]
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-4 * scale + 1e-6, (name, sigma)  # float32 cancellation: 1e-6 of the input range


def test_differences_of_gaussians_go_from_the_two_finest_scales_to_every_coarser_one(bank, image):
    pairs = [(a, b) for a, b in combinations(MULTISCALE_SIGMAS, 2) if a in MULTISCALE_SIGMAS[:2]]
    assert [name for name in bank if name.startswith("dog")] == [f"dog_s{a:g}_s{b:g}" for a, b in pairs]
    for a, b in pairs:
        np.testing.assert_allclose(bank[f"dog_s{a:g}_s{b:g}"], blur(image, a) - blur(image, b), atol=2e-6)


def test_strips_equal_the_whole_image():
    image = torch.from_numpy(np.random.default_rng(4).random((530, 70)).astype(np.float32))[None, None]
    whole = multiscale_features(image)
    for y0, strip in feature_strips(multiscale_features, image, multiscale_halo(), rows=128):
        np.testing.assert_allclose(strip.numpy(), whole[..., y0 : y0 + strip.shape[-2], :].numpy(), atol=2e-6)


def test_an_image_that_fits_one_strip_is_computed_whole_without_halo_rows():
    image = torch.from_numpy(np.random.default_rng(6).random((200, 64)).astype(np.float32))[None, None]
    seen = []

    def bank(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return multiscale_features(x)

    (y0, strip), = feature_strips(bank, image, multiscale_halo(), rows=256)
    assert y0 == 0 and seen == [(1, 1, 200, 64)]
    np.testing.assert_array_equal(strip.numpy(), multiscale_features(image).numpy())


@pytest.mark.parametrize("sigma", [s for s in MULTISCALE_SIGMAS if STRUCTURE_TENSOR_RATIO * s >= DECIMATED_FROM])
def test_the_decimated_structure_tensor_is_within_2e_4_of_smoothing_every_pixel(isb_three_phase, sigma):
    """The largest scales' gradient products are smoothed on every 4th pixel: on a micrograph (and its
    mirrored borders) the three components stay within 2e-4 (relative L2) of the full computation."""
    import tifffile

    image = torch.from_numpy(tifffile.imread(isb_three_phase / "image.tif").astype(np.float32) / 255)[None, None]
    gx, gy, *_ = differences(gaussian_blur_bank(image - image.mean(), [sigma], margin=1)[:, :, 0])
    smoothing = STRUCTURE_TENSOR_RATIO * sigma
    jxx, jyy = gaussian_blur_two(gx * gx, gy * gy, smoothing)
    jxy, _ = gaussian_blur_two(gx * gy, None, smoothing, odd=True)
    for got, expected in zip(decimated_structure_tensor(gx.clone(), gy.clone(), smoothing, DECIMATION), (jxx, jyy, jxy)):
        assert float((got - expected).norm() / expected.norm()) <= 2e-4


@pytest.mark.parametrize("shape", [(5, 7), (1, 40), (40, 1)])
def test_an_image_smaller_than_the_largest_scale_is_mirrored_not_refused(shape):
    image = np.random.default_rng(5).integers(0, 255, shape, dtype=np.uint8)
    features = FEATURE_SETS["multiscale"].compute(image)
    assert features.shape == (53, *shape) and np.isfinite(features).all()



def test_a_16_bit_image_using_a_sliver_of_its_range_keeps_every_channel_of_its_8_bit_twin(isb_three_phase):
    """256 of 65536 grey values (intensities 0.015-0.019): every channel is the 8-bit image's, scaled
    (the structure tensor quadratically), to float32 precision; nothing collapses to rounding noise."""
    import tifffile

    image = tifffile.imread(isb_three_phase / "image.tif")[:256, :256]
    eight = FEATURE_SETS["multiscale"].compute(image)
    sixteen = FEATURE_SETS["multiscale"].compute((1000 + image.astype(np.uint16)).astype(np.uint16))
    ratio = 255 / 65535
    for name, a, b in zip(multiscale_channel_names(), eight, sixteen):
        expected = a * ratio + 1000 / 65535 if name.startswith("gaussian") else a * (ratio**2 if "structure" in name else ratio)
        assert np.linalg.norm(b - expected) <= 1e-3 * np.linalg.norm(expected), name


def test_strips_are_as_tall_as_256_mb_allows_so_a_wide_halo_is_computed_once():
    from dinofeat_server.engine.strips import strip_rows

    assert strip_rows(512, 512, 53, multiscale_halo()) == 512  # a 512 x 512 image: one strip
    assert strip_rows(300, 512, 53, multiscale_halo()) == 512  # never more than the image needs (whole chunks)
    assert strip_rows(4096, 4096, 53, multiscale_halo()) == 256  # wide images: the chunk row, bounded memory
