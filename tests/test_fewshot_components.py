"""Few-shot post-processing chosen from the support masks: one solid object keeps the most confident
component of each query's prediction, networks and scattered particles keep every component.

Also: support masks (and images) saved with a length-1 axis, as ImageJ saves one image, are used as
2-D; a mask that still differs from its image is refused in one sentence (labels: test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import SHARED_DATA, dinofeat
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import check_image
from dinofeat_server.segment.fewshot import keeps_one_component, most_confident_component, one_solid_object, solidity

EM = SHARED_DATA / "em_membranes"
MEMBRANE = 127
MATRIX = 85


def disk(shape=(128, 128), centre=(64, 64), radius=30) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def test_a_disk_is_one_solid_object():
    assert solidity(disk()) == pytest.approx(1.0, abs=0.05)
    assert one_solid_object(disk())


def test_a_disk_with_a_labelling_speck_is_still_one_object():
    mask = disk()
    mask[2:4, 2:4] = True
    assert one_solid_object(mask)


def test_many_blobs_are_not_one_object():
    mask = np.zeros((128, 128), bool)
    for cy in range(16, 128, 32):
        for cx in range(16, 128, 32):
            mask |= disk(centre=(cy, cx), radius=6)
    assert not one_solid_object(mask)


def test_a_thin_connected_network_is_not_one_solid_object():
    mask = np.zeros((128, 128), bool)
    mask[::25, :] = mask[:, ::25] = True  # one 8-connected grid of 1-pixel lines
    mask = mask | np.roll(mask, 1, 0) | np.roll(mask, 1, 1)
    assert not one_solid_object(mask)


def test_a_phase_with_holes_stays_one_object():
    mask = ~(disk(radius=20) | disk(centre=(20, 20), radius=8))
    assert one_solid_object(mask)


def test_every_labelled_support_plane_must_show_one_object():
    blobs = disk(radius=5) | disk(centre=(100, 100), radius=5)
    assert keeps_one_component([disk(), np.zeros((128, 128), bool)])
    assert not keeps_one_component([disk(), blobs])
    assert not keeps_one_component([np.stack([disk(), blobs])])


def test_explicit_choices_override_the_support_masks():
    assert keeps_one_component([disk(radius=5) | disk(centre=(100, 100), radius=5)], "most_confident")
    assert not keeps_one_component([disk()], "all")
    with pytest.raises(DinofeatError, match="unknown components choice 'biggest'"):
        keeps_one_component([disk()], "biggest")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def few_shot_dice(client: FeatureClient, support: np.ndarray, mask: np.ndarray, query: np.ndarray, truth: np.ndarray,
                  output: Path) -> dict[str, float]:
    """Dice of the default (auto) prediction and of both forced post-processings of the same probability."""
    path = client.few_shot([support], [mask.astype(np.uint8)], query, output, "classical")
    with h5py.File(path, "r") as f:
        auto, probability = f["fewshot"][0] > 0.5, f["fewshot"][1]
        kept = f["fewshot"].attrs["kept"]
    everything = probability > 0.5
    return {"auto": dice(auto, truth), "all": dice(everything, truth), "kept": kept,
            "most_confident": dice(most_confident_component(probability, everything), truth)}


@pytest.mark.parametrize("support_slice", [10, 12, 14])
def test_membranes_of_the_next_em_slice_keep_the_better_post_processing(server_address, tmp_path, support_slice):
    if not EM.is_dir():
        pytest.skip(f"the shared data folder {EM} is absent")
    support = tifffile.imread(EM / f"slice{support_slice}_image.tif")
    mask = tifffile.imread(EM / f"slice{support_slice}_ground_truth.tif") == MEMBRANE
    query = tifffile.imread(EM / f"slice{support_slice + 1}_image.tif")
    truth = tifffile.imread(EM / f"slice{support_slice + 1}_ground_truth.tif") == MEMBRANE
    with FeatureClient(server_address) as client:
        scores = few_shot_dice(client, support, mask, query, truth, tmp_path / "fewshot.h5")
    print(f"EM {support_slice}->{support_slice + 1}", scores)
    assert scores["kept"] == "all"
    assert scores["auto"] >= max(scores["all"], scores["most_confident"]) - 0.03


def test_the_isb_matrix_keeps_its_most_confident_component(isb_three_phase, server_address, tmp_path):
    image = tifffile.imread(isb_three_phase / "image.tif")
    truth = tifffile.imread(isb_three_phase / "ground_truth.tif") == MATRIX
    with FeatureClient(server_address) as client:
        scores = few_shot_dice(client, image[:, :256], truth[:, :256], image[:, 256:], truth[:, 256:], tmp_path / "fewshot.h5")
    print("ISB matrix", scores)
    assert scores["kept"] == "most_confident"
    assert scores["auto"] >= 0.9


@pytest.mark.parametrize("shape", [(1, 40, 30), (40, 30, 1)])
def test_an_image_with_a_length_one_axis_is_a_2d_image(shape):
    assert check_image(np.zeros(shape, np.uint8)).shape == (40, 30)


def few_shot_with_mask(tmp_path: Path, server_address: str, mask: np.ndarray):
    """Run `dinofeat fewshot` on a 40x40 image with itself as the support and `mask` (saved as is) as its mask."""
    tifffile.imwrite(tmp_path / "image.tif", (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8))
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    assert tifffile.imread(tmp_path / "mask.tif").shape == mask.shape
    (tmp_path / "out").mkdir()
    return dinofeat("fewshot", str(tmp_path / "image.tif"), "--support", str(tmp_path / "image.tif"), "--support-mask",
                    str(tmp_path / "mask.tif"), "-o", str(tmp_path / "out"), "--set", "classical", "--quiet",
                    "--server", server_address)


def test_a_support_mask_saved_as_y_x_1_is_used(tmp_path, server_address):
    mask = np.zeros((40, 40, 1), np.uint8)
    mask[10:30, 10:30] = 255
    result = few_shot_with_mask(tmp_path, server_address, mask)
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(tmp_path / "out" / "image_mask.tif").shape == (40, 40)


def test_a_support_mask_that_still_differs_after_dropping_length_one_axes_is_refused(tmp_path, server_address):
    result = few_shot_with_mask(tmp_path, server_address, np.ones((1, 30, 40), np.uint8))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # once, before any query, naming the file and its shape as saved
    assert (f"the support mask {tmp_path / 'mask.tif'} has shape (1, 30, 40) ((30, 40) without its length-1 axes) but its image "
            "has (40, 40); they must match pixel for pixel.") in result.stderr
    assert not list((tmp_path / "out").iterdir())
