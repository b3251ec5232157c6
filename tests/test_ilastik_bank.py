"""ilastik's 37-feature bank in torch equals real ilastik's own feature computation, channel by channel.

The reference is ilastik's Pixel Classification feature operator (OpFeatureSelectionNoCache, which runs
OpPixelFeaturesPresmoothed with fastfilters) with all 37 features selected, run in real ilastik's python
(installed by ../shared/tools/ilastik/install.sh; skipped when it cannot be).
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import tifffile
import torch
from conftest import SHARED_DATA
from dinofeat_server.engine.ilastik_bank import (
    ILASTIK_SCALES,
    ilastik_channel_names,
    ilastik_features,
    ilastik_halo,
)
from dinofeat_server.engine.strips import feature_strips
from ilastik_install import ilastik_launcher, ilastik_python

IMAGES = {
    "isb_three_phase": SHARED_DATA / "isb_three_phase" / "image.tif",
    "em_slice13": SHARED_DATA / "em_membranes" / "slice13_image.tif",
}
INTERIOR_RTOL = 1e-3
"""Relative L2 error allowed per channel (measured: at most 3.3e-4, DoG at scale 10, float32 cancellation)."""
ST_BORDER = 2
"""Pixels from the border where the structure tensor differs by design (odd extension of Gx * Gy)."""

ILASTIK_SCRIPT = r'''
import json, logging, sys
logging.disable(logging.WARNING)
import numpy as np, tifffile, vigra
from lazyflow.graph import Graph
import lazyflow.operators.filterOperators as filter_operators
from ilastik.applets.featureSelection.opFeatureSelection import (
    OpFeatureSelectionNoCache, defaultScales, getFeatureIdOrder)

assert filter_operators.WITH_FAST_FILTERS, "lazyflow does not use fastfilters"
out = sys.argv[1]
for item in sys.argv[2:]:
    name, path = item.split("=", 1)
    op = OpFeatureSelectionNoCache(graph=Graph())
    op.InputImage.setValue(vigra.taggedView(tifffile.imread(path)[..., None], "yxc"))
    op.Scales.setValue(defaultScales)
    op.FeatureIds.setValue(getFeatureIdOrder())
    op.ComputeIn2d.setValue([True] * len(defaultScales))
    selection = np.ones((len(getFeatureIdOrder()), len(defaultScales)), dtype=bool)
    selection[1:, 0] = False  # the full selection ilastik allows: only Gaussian smoothing at 0.3
    op.SelectionMatrix.setValue(selection)
    np.save(f"{out}/{name}.npy", np.moveaxis(op.OutputImage[:].wait(), -1, 0))
    with open(f"{out}/{name}.json", "w") as f:
        json.dump({"scales": list(defaultScales), "channels": op.opPixelFeatures.Output.meta.channel_names}, f)
'''


@pytest.fixture(scope="module")
def ilastik_reference(tmp_path_factory) -> dict[str, tuple[np.ndarray, dict]]:
    """Per image: ilastik's features (49, H, W) float32 and its metadata (scales, channel names)."""
    python = ilastik_python(ilastik_launcher())
    out = tmp_path_factory.mktemp("ilastik_features")
    script = out / "features.py"
    script.write_text(ILASTIK_SCRIPT)
    done = subprocess.run([str(python), "-P", str(script), str(out), *(f"{k}={v}" for k, v in IMAGES.items())],
                          check=False, capture_output=True, text=True, timeout=600, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {k: (np.load(out / f"{k}.npy"), json.loads((out / f"{k}.json").read_text())) for k in IMAGES}


def our_name(ilastik_name: str) -> str:
    """'Hessian of Gaussian Eigenvalues (σ=0.7) in 2D [1]' -> 'hessian_of_gaussian_eigenvalue2_s0.7'."""
    match = re.fullmatch(r"(.+) \(σ=([\d.]+)\)(?: in 2D)?(?: \[(\d)\])?", ilastik_name)
    assert match, ilastik_name
    feature, scale, eigen = match.groups()
    feature = feature.lower().replace(" ", "_")
    if eigen is not None:
        feature = feature.removesuffix("s") + str(int(eigen) + 1)
    return f"{feature}_s{scale}"


def relative_l2(ours: np.ndarray, reference: np.ndarray, where: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(ours[where] - reference[where]) / max(np.linalg.norm(reference[where]), 1e-30))


def band(shape: tuple[int, int], width: int) -> np.ndarray:
    """True within `width` pixels of the image border."""
    inside = np.zeros(shape, dtype=bool)
    inside[width:-width, width:-width] = True
    return ~inside


def test_the_bank_names_49_channels_in_ilastiks_own_order(ilastik_reference):
    for features, meta in ilastik_reference.values():
        assert tuple(meta["scales"]) == ILASTIK_SCALES
        assert [our_name(n) for n in meta["channels"]] == ilastik_channel_names()
        assert features.shape[0] == len(ilastik_channel_names()) == 49


@pytest.mark.parametrize("image_name", list(IMAGES))
def test_every_channel_matches_real_ilastik(ilastik_reference, image_name):
    reference, _ = ilastik_reference[image_name]
    image = tifffile.imread(IMAGES[image_name])
    ours = ilastik_features(torch.from_numpy(image.astype(np.float32))[None, None])[0, 0].double().numpy()
    border = band(image.shape, ilastik_halo())
    st_border = band(image.shape, ST_BORDER)
    interior, outer = [], []
    print(f"\n{image_name}: relative L2 per channel, interior / border band of {ilastik_halo()} px")
    for k, name in enumerate(ilastik_channel_names()):
        interior.append(relative_l2(ours[k], reference[k], ~border))
        outer.append(relative_l2(ours[k], reference[k], border))
        print(f"  {name:40s} {interior[-1]:.1e} / {outer[-1]:.1e}")
        assert interior[-1] <= INTERIOR_RTOL, name
        if name.startswith("structure_tensor"):  # equal beyond the two border pixels that differ by design
            assert relative_l2(ours[k], reference[k], ~st_border) <= INTERIOR_RTOL, name
        else:  # fastfilters' own mirrored borders
            assert relative_l2(ours[k], reference[k], np.ones_like(border)) <= INTERIOR_RTOL, name
    print(f"  interior: max {max(interior):.1e}, median {np.median(interior):.1e}; "
          f"border band: max {max(outer):.1e}, median {np.median(outer):.1e}")


@pytest.fixture(scope="module")
def small_stack() -> torch.Tensor:
    """Two images of two channels, 150 x 61 (smooth noise with edges, raw 8-bit-like intensities)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 2, 150, 61, generator=generator) * 255
    return torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)


def test_strips_with_the_halo_equal_the_whole_image(small_stack):
    whole = ilastik_features(small_stack)
    for rows in (40, 64):
        strips = torch.empty_like(whole)
        for y0, block in feature_strips(ilastik_features, small_stack, ilastik_halo(), rows):
            strips[..., y0 : y0 + block.shape[-2], :] = block
        torch.testing.assert_close(strips, whole, rtol=1e-5, atol=1e-4)


def test_each_image_channel_is_computed_alone(small_stack):
    whole = ilastik_features(small_stack)
    torch.testing.assert_close(whole[1, 0], ilastik_features(small_stack[1:, :1])[0, 0], rtol=0, atol=0)
    assert whole.shape == (2, 2, 49, 150, 61) and whole.dtype == torch.float32


def test_intensity_scaling_is_linear_except_for_the_quadratic_structure_tensor(small_stack):
    raw, scaled = ilastik_features(small_stack[:1, :1]), ilastik_features(small_stack[:1, :1] / 255.0)
    quadratic = torch.tensor([n.startswith("structure_tensor") for n in ilastik_channel_names()])
    power = torch.where(quadratic, 2.0, 1.0)[:, None, None]
    torch.testing.assert_close(scaled[0, 0] * 255.0**power, raw[0, 0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(8, 8), (1, 40), (40, 1), (3, 5)])
def test_images_smaller_than_the_halo_are_mirrored_periodically(shape):
    image = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(1, 1, *shape) % 7
    whole = ilastik_features(image)
    assert whole.shape == (1, 1, 49, *shape) and torch.isfinite(whole).all()
    strips = torch.cat([block for _, block in feature_strips(ilastik_features, image, ilastik_halo(), 3)], dim=-2)
    torch.testing.assert_close(strips, whole, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_gpu_computes_the_same_bank(small_stack):
    torch.testing.assert_close(ilastik_features(small_stack.cuda()).cpu(), ilastik_features(small_stack),
                               rtol=1e-4, atol=1e-3)
