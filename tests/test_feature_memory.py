"""New scribbles on an image the server segmented a moment ago (napari's live mode, more strokes in Fiji): the server
keeps that image's features, so it trains and predicts without computing them again, with the same result."""

from __future__ import annotations

import numpy as np
import tifffile
from conftest import InProcessServer
from dinofeat_client.sample import three_phase_sample


def scribbles_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample image, its scribbles, and the scribbles with one more stroke of class 1."""
    sample = three_phase_sample()
    more = sample.scribbles.copy()
    rows, columns = np.nonzero(sample.truth == 1)
    more[rows[:40], columns[:40]] = 1
    return sample.image, sample.scribbles, more


def test_new_scribbles_on_the_same_image_train_without_computing_its_features_again(inprocess_server, tmp_path):
    image, first, second = scribbles_pair()
    with inprocess_server.client() as client:
        client.segment(image, first, tmp_path / "first.tif")
        stages = []
        client.segment(image, second, tmp_path / "second.tif", progress=lambda stage, done, total: stages.append(stage))
    assert "training" in stages and not [stage for stage in stages if stage.endswith("rows")]


def test_remembered_features_give_the_class_map_a_fresh_server_computes(inprocess_server, tmp_path):
    image, first, second = scribbles_pair()
    with inprocess_server.client() as client:
        client.segment(image, first, tmp_path / "first.tif")
        client.segment(image, second, tmp_path / "remembered.tif")
    fresh = InProcessServer()
    try:
        with fresh.client() as client:
            client.segment(image, second, tmp_path / "fresh.tif")
    finally:
        fresh.stop()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "remembered.tif"), tifffile.imread(tmp_path / "fresh.tif"))
