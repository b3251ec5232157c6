"""The Weka-like bank equals an independent scipy/numpy computation, channel by channel."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from dinofeat_server.engine.classical import (
    WEKA_SIGMAS,
    weka_channel_names,
    weka_features,
    weka_halo,
)
from dinofeat_server.engine.filters import (
    line_kernels,
    line_responses,
    median_along,
    mirror_pad,
)
from dinofeat_server.engine.stacks import FEATURE_SETS
from dinofeat_server.engine.strips import feature_strips
from scipy import ndimage as ndi

ATOL = 2e-5


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ndi.gaussian_filter(rng.random((96, 80)), 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def bank(image) -> dict[str, np.ndarray]:
    out = weka_features(torch.from_numpy(image)[None, None])[0, 0].numpy()
    return dict(zip(weka_channel_names(), out))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(image.astype(np.float64), 0.4 * sigma, mode="mirror", truncate=4.0)


def hessian_reference(image: np.ndarray) -> dict[str, np.ndarray]:
    a = ndi.correlate1d(image.astype(np.float64), [1, -2, 1], axis=1, mode="mirror")
    d = ndi.correlate1d(image.astype(np.float64), [1, -2, 1], axis=0, mode="mirror")
    b = ndi.correlate1d(ndi.correlate1d(image.astype(np.float64), [-0.5, 0, 0.5], axis=0, mode="mirror"),
                        [-0.5, 0, 0.5], axis=1, mode="mirror")
    eig = np.linalg.eigvalsh(np.stack([np.stack([a, b], -1), np.stack([b, d], -1)], -2))
    return {"mod": np.sqrt(a * a + b * b + d * d), "trace": a + d, "det": a * d - b * b, "eig1": eig[..., 1], "eig2": eig[..., 0]}


def sobel_reference(image: np.ndarray) -> np.ndarray:
    gx = ndi.sobel(image.astype(np.float64), axis=1, mode="mirror") / 8
    gy = ndi.sobel(image.astype(np.float64), axis=0, mode="mirror") / 8
    return np.hypot(gx, gy)


def test_greyscale_bank_has_58_named_channels_in_documented_order():
    names = weka_channel_names()
    assert len(names) == 58 and len(set(names)) == 58
    assert names[:3] == ["raw", "sobel_s0", "hessian_mod_s0"]
    assert names[7:9] == ["gaussian_s1", "sobel_s1"]
    assert "dog_s1_s4" in names and "hessian_det_s2" in names
    assert names[-6:] == ["membrane_mean", "membrane_max", "membrane_min", "membrane_sum", "membrane_std", "membrane_median"]


def test_raw_channel_is_the_image(image, bank):
    np.testing.assert_array_equal(bank["raw"], image)


@pytest.mark.parametrize("sigma", WEKA_SIGMAS)
def test_gaussian_channels_equal_scipy_gaussian_filter_at_04_sigma(image, bank, sigma):
    np.testing.assert_allclose(bank[f"gaussian_s{sigma}"], blur(image, sigma), atol=ATOL)


@pytest.mark.parametrize("sigma", (0,) + WEKA_SIGMAS)
def test_sobel_channels_equal_scipy_sobel_magnitude(image, bank, sigma):
    source = image if sigma == 0 else blur(image, sigma)
    np.testing.assert_allclose(bank[f"sobel_s{sigma}"], sobel_reference(source), atol=ATOL)


@pytest.mark.parametrize("sigma", (0,) + WEKA_SIGMAS)
def test_hessian_channels_equal_central_differences_and_eigvalsh(image, bank, sigma):
    source = image if sigma == 0 else blur(image, sigma)
    for name, expected in hessian_reference(source).items():
        np.testing.assert_allclose(bank[f"hessian_{name}_s{sigma}"], expected, atol=ATOL, err_msg=name)


def test_difference_of_gaussians_subtract_larger_from_smaller_blur(image, bank):
    for a, b in combinations(WEKA_SIGMAS, 2):
        np.testing.assert_allclose(bank[f"dog_s{a}_s{b}"], blur(image, a) - blur(image, b), atol=ATOL)


def test_membrane_projections_equal_numpy_reductions_of_scipy_correlations(image, bank):
    responses = np.stack([ndi.correlate(image.astype(np.float64), k[0].numpy().astype(np.float64), mode="mirror")
                          for k in line_kernels(19, 30)])
    expected = {"mean": responses.mean(0), "max": responses.max(0), "min": responses.min(0), "sum": responses.sum(0),
                "std": responses.std(0), "median": np.median(responses, 0)}
    for name, value in expected.items():
        np.testing.assert_allclose(bank[f"membrane_{name}"], value, atol=1e-4, err_msg=name)


def test_line_kernels_are_one_pixel_lines_through_the_centre():
    kernels = line_kernels(19, 30)[:, 0].numpy()
    assert kernels.shape == (30, 19, 19)
    vertical = np.zeros((19, 19))
    vertical[:, 9] = 1
    np.testing.assert_array_equal(kernels[0], vertical)
    np.testing.assert_array_equal(kernels[15], vertical.T)  # 90 degrees
    for kernel in kernels:
        assert kernel[9, 9] == 1
        np.testing.assert_array_equal(kernel, kernel[::-1, ::-1])  # half-turn symmetric
        steps = kernel.sum(axis=1) if kernel.sum(axis=1).max() == 1 else kernel.sum(axis=0)
        assert steps.max() == 1 and 13 <= kernel.sum() <= 19


def test_line_responses_by_taps_equal_the_dense_convolution(image):
    tensor = torch.from_numpy(image)[None, None]
    kernels = line_kernels(19, 30)
    np.testing.assert_allclose(line_responses(tensor, kernels, "taps").numpy(),
                               line_responses(tensor, kernels, "convolution").numpy(), atol=1e-5)


def test_rgb_image_gives_three_named_groups_of_58():
    fset = FEATURE_SETS["classical"]
    names = fset.channel_names(3)
    assert len(names) == 174 and names[0] == "red_raw" and names[58] == "green_raw" and names[-1] == "blue_membrane_median"
    rgb = np.random.default_rng(1).random((40, 48, 3)).astype(np.float32)
    stack = fset.compute(rgb)
    assert stack.shape == (174, 40, 48)
    green_alone = fset.compute(rgb[..., 1])
    np.testing.assert_allclose(stack[58:116], green_alone, atol=1e-6)


def test_strips_reproduce_the_whole_image_result(image):
    tensor = torch.from_numpy(image)[None, None]
    whole = weka_features(tensor)
    strips = [block for _, block in feature_strips(weka_features, tensor, weka_halo(), rows=32)]
    np.testing.assert_allclose(torch.cat(strips, dim=-2).numpy(), whole.numpy(), atol=1e-5)


def test_mirror_pad_matches_numpy_reflect_even_when_wider_than_the_image():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(mirror_pad(x, 5, 7)[0, 0].numpy(), np.pad(x[0, 0].numpy(), ((5, 5), (7, 7)), mode="reflect"))


@pytest.mark.parametrize("count", (5, 30))
def test_median_along_matches_numpy_median(count):
    values = torch.from_numpy(np.random.default_rng(count).random((count, 70, 33)).astype(np.float32))
    np.testing.assert_allclose(median_along(values, 0).numpy(), np.median(values.numpy(), 0), atol=1e-7)
