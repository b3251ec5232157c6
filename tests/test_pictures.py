"""--pictures: the class overlay says which colour is which class, probability maps come with or
without --probabilities, and a stack gets pictures of its middle slice."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile
from conftest import run_cli
from dinofeat_client.pictures import PALETTE, class_overlay, colour_names, legend_band


def test_the_overlay_ends_in_a_legend_band_with_each_class_colour():
    image = np.zeros((40, 120), np.uint8)
    class_map = np.repeat(np.array([85, 170, 255], np.uint8), 40)[None].repeat(40, axis=0)
    picture = class_overlay(image, class_map)
    assert picture.shape == (40 + 2 * 18, 120, 3)  # three classes need two legend rows at this width
    band = picture[40:]
    np.testing.assert_array_equal(band, legend_band([85, 170, 255], 120))
    swatches = {tuple(int(c) for c in pixel) for pixel in band.reshape(-1, 3)}
    assert {tuple(int(c) for c in PALETTE[i]) for i in range(3)} <= swatches
    assert (band == 0).all(axis=-1).sum() > 50  # the class values, drawn in black


def test_colour_names_follow_the_overlay_order():
    assert colour_names([85, 170, 255]) == "85 red, 170 green, 255 blue"


@pytest.fixture()
def two_phases(tmp_path):
    rng = np.random.default_rng(0)
    image = np.full((48, 48), 50.0)
    image[:, 24:] = 200
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((48, 48), np.uint8)
    labels[5:40, 3:8], labels[5:40, 40:45] = 1, 2
    return image, labels


def test_pictures_without_probabilities_still_draw_each_class_and_leave_no_hidden_file(two_phases, tmp_path, inprocess_address):
    image, labels = two_phases
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    result = run_cli("segment", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "seg.tif"),
                      "--set", "classical", "--pictures", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "lab.tif", "seg.overlay.png", "seg.p1.png", "seg.p2.png", "seg.tif"]
    assert "overlay colours: 1 red, 2 green" in result.stdout
    assert imagecodecs.imread(str(tmp_path / "seg.p2.png"))[:, 30:].mean() > 200


def test_pictures_of_a_stack_show_its_middle_slice(two_phases, tmp_path, inprocess_address):
    image, labels = two_phases
    stack = np.stack([image, image[:, ::-1], image])
    stack_labels = np.stack([labels, np.zeros_like(labels), labels])
    tifffile.imwrite(tmp_path / "img.tif", stack)
    tifffile.imwrite(tmp_path / "lab.tif", stack_labels)
    result = run_cli("segment", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "seg.tif"),
                      "--set", "classical", "--pictures", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert "pictures of the middle slice, z = 1 of 0..2" in result.stdout
    overlay = imagecodecs.imread(str(tmp_path / "seg.overlay.png"))
    assert overlay.shape == (48 + 2 * 18, 48, 3)  # two legend rows at this width
    assert imagecodecs.imread(str(tmp_path / "seg.p2.png"))[:, :18].mean() > 200  # the flipped slice: class 2 on the left
