"""DINOv2, attention and hybrid feature sets through the real server, client and command line."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile
import torch
from conftest import run_cli
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.metrics import mean_iou
from dinofeat_server.engine.deep import PRESETS, DeepExtractor
from dinofeat_server.engine.space import input_range
from dinofeat_server.engine.weights import file_sha256, load_backbone


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(7).random((90, 110)) * 255).astype(np.uint8)


def test_dinov2_set_streams_full_resolution_features_equal_to_the_engine(inprocess_deep_address, tiny_weights, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        client.fetch_features(image, tmp_path / "d.h5", "dinov2", preset="fast")
    low, high = input_range([image])  # the dataset's robust intensity range becomes [0, 1]
    scaled = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    expected = DeepExtractor(load_backbone(tiny_weights), torch.device("cpu")).features(scaled, PRESETS["fast"])
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["features"]
        assert ds.shape == (128, 90, 110)
        assert list(ds.attrs["channel_names"][:2]) == ["dino_000", "dino_001"]
        assert ds.attrs["backbone"] == "dinov2_vits14"
        assert ds.attrs["weights_sha256"] == file_sha256(tiny_weights)
        spec = json.loads(ds.attrs["feature_set"])
        assert spec["preset"] == "fast" and spec["stride"] == 14 and spec["upsampler"] == "joint_bilateral"
        np.testing.assert_allclose(ds[()], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_attention_set_has_one_channel_per_head(inprocess_deep_address, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        client.fetch_features(image, tmp_path / "a.h5", "attention", preset="fast")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert list(f["features"].attrs["channel_names"]) == ["attn_h0", "attn_h1"]
        assert (f["features"][()] >= 0).all()


def test_hybrid_set_is_deep_pca_then_classical_each_in_the_datasets_robust_range(inprocess_deep_address, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        client.fetch_features(image, tmp_path / "h.h5", "hybrid", preset="fast", pca=8)
    with h5py.File(tmp_path / "h.h5", "r") as f:
        ds = f["features"]
        names = list(ds.attrs["channel_names"])
        assert len(names) == 8 + 58 and names[0] == "dino_pca_00" and names[8] == "raw"
        data = ds[()]
        # the sample of a small image is the whole image: its 0.1 and 99.9 percentiles become 0 and 1
        np.testing.assert_allclose(np.percentile(data, 0.1, axis=(1, 2)), 0, atol=1e-3)
        varying = np.ptp(data, axis=(1, 2)) > 0.01
        assert varying.sum() >= 60
        np.testing.assert_allclose(np.percentile(data, 99.9, axis=(1, 2))[varying], 1, atol=1e-3)


def test_paper_preset_uses_stride_4_and_17_views(inprocess_deep_address, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        client.fetch_features(image[:40, :50], tmp_path / "p.h5", "dinov2", preset="paper", pca=4)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        spec = json.loads(f["features"].attrs["feature_set"])
        assert (spec["stride"], spec["views"], spec["view_mode"], spec["pca"]) == (4, 17, "paper", 4)
        assert f["features"].shape == (4, 40, 50)


def test_hybrid_segmentation_of_the_isb_data_with_a_random_tiny_vit(isb_three_phase, inprocess_deep_address, tmp_path):
    result = run_cli("segment", str(isb_three_phase / "image.tif"), "--labels", str(isb_three_phase / "scribbles.tif"),
                      "-o", str(tmp_path / "seg.tif"), "--set", "hybrid", "--preset", "fast", "--server", inprocess_deep_address)
    assert result.returncode == 0, result.stderr
    prediction = tifffile.imread(tmp_path / "seg.tif")
    # random deep channels add noise to the classical ones; the forest still finds the phases
    assert mean_iou(prediction, tifffile.imread(isb_three_phase / "ground_truth.tif")) > 0.6


def test_cli_embedded_server_takes_local_weights(tiny_weights, image, tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", image)
    result = run_cli("features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "f.h5"), "--set", "dinov2",
                      "--backbone", "dinov2_vits14", "--weights", str(tiny_weights), "--preset", "fast", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f["features"].shape == (128, 90, 110)


def test_weights_cannot_be_sent_to_a_remote_server(inprocess_address, tiny_weights, image, tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", image)
    result = run_cli("features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "f.h5"), "--set", "dinov2",
                      "--weights", str(tiny_weights), "--server", inprocess_address)
    assert result.returncode == 1 and "--weights names a file on this machine, but --server computes elsewhere" in result.stderr


def test_unknown_preset_and_backbone_are_refused(inprocess_deep_address, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        with pytest.raises(DinofeatError, match="unknown preset 'slow'; choose one of fast, default, paper, paper_flips"):
            client.fetch_features(image, tmp_path / "x.h5", "dinov2", preset="slow")
        with pytest.raises(DinofeatError, match="unknown backbone 'dinov3'"):
            client.fetch_features(image, tmp_path / "x.h5", "dinov2", backbone="dinov3")
    assert not list(tmp_path.iterdir())


def test_normalised_dinov2_features_have_unit_length_per_pixel(inprocess_deep_address, image, tmp_path):
    with FeatureClient(inprocess_deep_address) as client:
        client.fetch_features(image, tmp_path / "n.h5", "dinov2", preset="fast", normalise="l2")
    with h5py.File(tmp_path / "n.h5", "r") as f:
        np.testing.assert_allclose(np.linalg.norm(f["features"][()], axis=0), 1.0, atol=1e-5)
        assert json.loads(f["features"].attrs["feature_set"])["normalisation"] == "l2"


def test_the_description_and_the_engine_know_the_same_presets():
    from dinofeat.contract.computation import PRESETS as names
    from dinofeat_server.engine.deep import PRESETS as views

    assert tuple(views) == names
