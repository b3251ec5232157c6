"""AnyUp (engine/anyup.py): equal to the authors' module, loaded from their checkpoint files, tiled consistently, and
chosen with --upsampler anyup through the client and the command line, as part of the feature space's identity.

The official module is the vendored code (../shared/vendor/reference/anyup-351807a.tar.gz), unpacked and imported
as tests/reference_code.py does; its random weights are saved as an official checkpoint file. Nothing downloads."""

from __future__ import annotations

import importlib
import json
import sys

import h5py
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import in_process, run_cli
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.spaces import read_space
from dinofeat_server.engine.anyup import load_anyup, weights_file
from dinofeat_server.engine.deep import DeepExtractor, estimated_bytes, model_input, preset
from dinofeat_server.engine.space import input_range
from dinofeat_server.engine.tiles import tile_plan
from dinofeat_server.engine.weights import load_backbone
from reference_code import unpacked
from tiny_vit import tiny_model


@pytest.fixture(scope="module")
def official() -> torch.nn.Module:
    """The authors' AnyUp with seeded random weights; norms drawn too, so that every parameter counts."""
    folder = unpacked("anyup-351807a.tar.gz", "anyup-351807a")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    torch.manual_seed(0)
    model = importlib.import_module("anyup.model").AnyUp().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if "norm" in name or name.endswith(("block.0.weight", "block.3.weight")):  # RMSNorm and GroupNorm scales
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif name.endswith("bias"):
                value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def anyup_file(official, tmp_path_factory):
    """The official module's weights as a checkpoint file, saved as the authors save theirs (a state dict)."""
    path = tmp_path_factory.mktemp("anyup") / "anyup_random.pth"
    torch.save(official.state_dict(), path)
    return path


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("height, width, rows, columns, channels", [(84, 70, 6, 5, 16), (42, 98, 3, 7, 33), (64, 64, 16, 16, 8)])
def test_anyup_equals_the_official_module_with_random_weights(official, anyup_file, height, width, rows, columns, channels):
    generator = torch.Generator().manual_seed(height)
    image = torch.randn(1, 3, height, width, generator=generator)
    features = torch.randn(1, channels, rows, columns, generator=generator)
    ours = load_anyup(anyup_file)
    with torch.no_grad():
        expected = official(image, features)
        assert relative_l2(ours(image, features), expected) <= 1e-5
        assert relative_l2(ours(image, features, q_chunk_size=100), expected) <= 1e-5  # small query blocks
        assert relative_l2(ours(image, features, output_size=(40, 50)), official(image, features, output_size=(40, 50))) <= 1e-5


def test_a_mapped_feature_space_upsampled_equals_the_upsampled_features_mapped(anyup_file):
    generator = torch.Generator().manual_seed(3)
    image, features = torch.randn(1, 3, 56, 70, generator=generator), torch.randn(1, 12, 4, 5, generator=generator)
    weight, bias = torch.randn(3, 12, generator=generator), torch.randn(3, generator=generator)
    model = load_anyup(anyup_file)
    with torch.no_grad():
        mapped_later = torch.einsum("kc,bchw->bkhw", weight, model(image, features)) + bias[None, :, None, None]
        mapped_first = model(image, features, values=torch.einsum("kc,bchw->bkhw", weight, features) + bias[None, :, None, None])
    assert relative_l2(mapped_first, mapped_later) <= 1e-5


def test_a_file_that_is_no_anyup_checkpoint_is_refused_in_one_sentence(tiny_weights, tmp_path):
    with pytest.raises(DinofeatError, match=r"is not an AnyUp checkpoint .*; give anyup_multi_backbone.pth or anyup_paper.pth"):
        load_anyup(tiny_weights)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DinofeatError, match=r"^cannot read AnyUp weights from .*broken.pth \(\w+\); give"):
        load_anyup(tmp_path / "broken.pth")
    with pytest.raises(DinofeatError, match=r"^the AnyUp weights file .*absent.pth does not exist; give the path of"):
        weights_file(tmp_path / "absent.pth")


def test_the_fast_preset_with_anyup_is_the_official_anyup_of_the_whole_images_tokens(official, anyup_file):
    backbone = tiny_model()
    image = np.random.default_rng(0).random((98, 112)).astype(np.float32)  # 7 x 8 patches: one band, the whole image
    spec = preset("fast", upsampler="anyup")
    assert spec.stride == 14 and spec.upsampler == "anyup"
    ours = DeepExtractor(backbone, torch.device("cpu"), anyup_weights=str(anyup_file)).features(image, spec)
    normalised, _ = model_input(image, torch.device("cpu"))
    with torch.no_grad():
        expected = official(normalised, backbone(normalised, stride=14).patch_tokens)[0]
    assert relative_l2(ours, expected) <= 1e-5


def test_tiled_anyup_features_agree_with_untiled_and_respect_the_budget(anyup_file):
    backbone = tiny_model()
    image = np.random.default_rng(0).random((140, 308)).astype(np.float32)
    spec = preset("fast", upsampler="anyup")
    whole = DeepExtractor(backbone, torch.device("cpu"), anyup_weights=str(anyup_file)).features(image, spec)
    budget = 320 << 20  # the untiled image needs about 360 MB with AnyUp (its 128-channel encoders at full resolution)
    small = DeepExtractor(backbone, torch.device("cpu"), budget, anyup_weights=str(anyup_file))
    edge, batch = small.plan(140, 308, spec, 128)
    tiles = tile_plan(140, 308, edge, align=spec.stride)
    assert len(tiles) == 2
    assert all(estimated_bytes(t.height, t.width, 128, backbone, spec, batch) <= budget for t in tiles)
    cosine = F.cosine_similarity(small.features(image, spec), whole, dim=0)
    assert cosine.mean() > 0.99 and cosine.min() > 0.9  # the DINOv2 tiles' thresholds (test_dinov2_engine)


def test_the_paper_presets_and_unknown_upsamplers_are_refused_in_one_sentence():
    with pytest.raises(DinofeatError, match=r"^the paper preset reproduces the paper's own resizing, so --upsampler anyup cannot apply; "):
        FeatureComputation("dinov2", preset="paper", upsampler="anyup").checked()
    with pytest.raises(DinofeatError, match=r"^unknown upsampler 'lanczos'; choose one of bilinear, joint_bilateral, anyup\.$"):
        FeatureComputation("dinov2", upsampler="lanczos").checked()
    # a preset's own upsampler named is the same computation; a filter bank has none
    assert FeatureComputation("dinov2", preset="fast", upsampler="joint_bilateral").key() == FeatureComputation("dinov2", preset="fast").key()
    assert FeatureComputation("multiscale", upsampler="anyup").checked().upsampler == ""


@pytest.fixture(scope="module")
def anyup_server(tiny_weights, anyup_file):
    """An in-process server whose dinov2_vits14 is the tiny model and whose AnyUp holds the official random weights."""
    yield from in_process(weights={"dinov2_vits14": str(tiny_weights), "anyup": str(anyup_file)})


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(7).random((84, 98)) * 255).astype(np.uint8)


def test_the_client_asks_for_anyup_and_the_file_records_it_equal_to_the_engine(anyup_server, tiny_weights, anyup_file, image, tmp_path):
    with anyup_server.client() as client:
        client.fetch_features(image, tmp_path / "anyup.h5", "dinov2", preset="fast", upsampler="anyup")
    low, high = input_range([image])
    scaled = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    extractor = DeepExtractor(load_backbone(tiny_weights), torch.device("cpu"), anyup_weights=str(anyup_file))
    expected = extractor.features(scaled, preset("fast", upsampler="anyup"))
    with h5py.File(tmp_path / "anyup.h5", "r") as f:
        ds = f["features"]
        assert json.loads(ds.attrs["feature_set"])["upsampler"] == "anyup"
        assert json.loads(ds.attrs["computation"])["upsampler"] == "anyup"
        np.testing.assert_allclose(ds[()], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_space_of_joint_bilateral_features_is_refused_on_anyup_features(anyup_server, image, tmp_path):
    with anyup_server.client() as client:
        client.fetch_features(image, tmp_path / "jbu.h5", "dinov2", preset="fast", pca=4)
        with pytest.raises(DinofeatError, match=r"fitted for --upsampler joint_bilateral, not anyup; compute the features with the same"):
            client.fetch_features(image, tmp_path / "anyup.h5", "dinov2", preset="fast", pca=4, upsampler="anyup",
                                  like=read_space(tmp_path / "jbu.h5"))


def test_the_features_command_takes_upsampler_anyup_and_its_weights_file(tiny_weights, anyup_file, image, tmp_path):
    tifffile.imwrite(tmp_path / "cells.tif", image)
    result = run_cli("features", str(tmp_path / "cells.tif"), "-o", str(tmp_path / "f.h5"), "--set", "dinov2", "--preset", "fast",
                     "--weights", str(tiny_weights), "--upsampler", "anyup", "--upsampler-weights", str(anyup_file))
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert json.loads(f["features"].attrs["feature_set"])["upsampler"] == "anyup"
    refused = run_cli("features", str(tmp_path / "cells.tif"), "-o", str(tmp_path / "p.h5"), "--set", "dinov2", "--preset", "paper",
                      "--weights", str(tiny_weights), "--upsampler", "anyup")
    assert refused.returncode != 0
    assert "the paper preset reproduces the paper's own resizing, so --upsampler anyup cannot apply" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_space_fitted_with_one_anyup_file_is_refused_on_features_of_another(official, tiny_weights, anyup_file, image, tmp_path):
    other = {name: value + 0.01 if name.endswith("bias") else value for name, value in official.state_dict().items()}
    torch.save(other, tmp_path / "anyup_other.pth")
    tifffile.imwrite(tmp_path / "cells.tif", image)
    computed = run_cli("features", str(tmp_path / "cells.tif"), "-o", str(tmp_path / "a.h5"), "--set", "dinov2", "--preset",
                       "fast", "--pca", "4", "--weights", str(tiny_weights), "--upsampler", "anyup",
                       "--upsampler-weights", str(anyup_file))
    assert computed.returncode == 0, computed.stderr
    refused = run_cli("features", str(tmp_path / "cells.tif"), "-o", str(tmp_path / "b.h5"), "--like", str(tmp_path / "a.h5"),
                      "--weights", str(tiny_weights), "--upsampler-weights", str(tmp_path / "anyup_other.pth"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "fitted for AnyUp weights with sha256" in refused.stderr and "(another --upsampler-weights file)" in refused.stderr
    assert not (tmp_path / "b.h5").exists()
