"""The real client against a real server process on loopback: files, values, resume, uploads."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import axistags
from dinofeat_server.engine.stacks import FEATURE_SETS, intensity_scaled


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((300, 280)) * 60000).astype(np.uint16)


@pytest.fixture()
def client(server_address):
    with FeatureClient(server_address) as client:
        yield client


def test_feature_sets_are_listed_with_channel_counts(client):
    sets = {s.name: s.channels_per_image_channel for s in client.feature_sets()}
    assert sets["classical"] == 58


def test_round_trip_writes_a_standard_h5_equal_to_the_engine_output(client, image, tmp_path):
    transfer = client.fetch_features(image, tmp_path / "f.h5", "classical")
    assert transfer.path == tmp_path / "f.h5" and not (tmp_path / "f.h5.partial").exists()
    assert transfer.chunk_count == transfer.chunks_received == 58 * 2 * 2
    expected = FEATURE_SETS["classical"].compute(image)  # raw intensities, scaled in-process as the server does
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ds = f["features"]
        assert ds.shape == (58, 300, 280) and ds.dtype == np.float32 and ds.chunks == (1, 256, 256)
        assert ds.compression == "gzip" and ds.compression_opts == 1 and ds.shuffle
        assert ds.attrs["axistags"] == axistags("cyx")
        assert list(ds.attrs["channel_names"]) == FEATURE_SETS["classical"].channel_names(1)
        assert json.loads(ds.attrs["feature_set"])["name"] == "classical"
        assert list(ds.attrs["source_shape"]) == [300, 280]
        np.testing.assert_array_equal(ds[()], expected)


def test_uncompressed_stream_stores_raw_chunks(client, image, tmp_path):
    client.fetch_features(image[:100, :90], tmp_path / "raw.h5", compression="none")  # the default set: multiscale, 53 channels
    with h5py.File(tmp_path / "raw.h5", "r") as f:
        assert f["features"].compression is None
        assert f["features"].shape == (53, 100, 90)


def test_a_broken_stream_is_resumed_by_requesting_only_the_missing_chunks(client, image, tmp_path):
    output = tmp_path / "resumed.h5"
    seen = []

    def break_after_40(stage, done, total):
        if stage == "receiving":
            seen.append(done)
            if done == 40:
                raise KeyboardInterrupt  # what Ctrl+C does mid-stream

    with pytest.raises(KeyboardInterrupt):
        client.fetch_features(image, output, progress=break_after_40)
    assert not output.exists() and (tmp_path / "resumed.h5.partial").exists()
    transfer = client.fetch_features(image, output)
    assert transfer.chunks_received == transfer.chunk_count - 40
    client.fetch_features(image, tmp_path / "whole.h5")
    with h5py.File(output, "r") as a, h5py.File(tmp_path / "whole.h5", "r") as b:
        np.testing.assert_array_equal(a["features"][()], b["features"][()])


def test_a_stack_gives_czyx_features_slice_by_slice(client, tmp_path):
    stack = (np.random.default_rng(4).random((3, 64, 50)) * 255).astype(np.uint8)
    client.fetch_features(stack, tmp_path / "stack.h5", "classical")
    with h5py.File(tmp_path / "stack.h5", "r") as f:
        ds = f["features"]
        assert ds.shape == (58, 3, 64, 50) and ds.chunks == (1, 1, 64, 50)
        assert [a["key"] for a in json.loads(ds.attrs["axistags"])["axes"]] == ["c", "z", "y", "x"]
        expected = FEATURE_SETS["classical"].compute(intensity_scaled(stack[1]))
        np.testing.assert_array_equal(ds[:, 1], expected)


def test_images_over_4_mib_upload_in_pieces_and_only_once(client):
    big = np.random.default_rng(5).random((1200, 1100)).astype(np.float32)  # 5.3 MB
    sha = client.upload(big)
    from dinofeat.v1 import feature_service_pb2 as pb

    assert client.stub.HasImage(pb.HasImageRequest(sha256=sha)).present
    assert client.upload(big) == sha


def test_unknown_feature_set_is_refused_with_the_known_ones(client, image, tmp_path):
    with pytest.raises(DinofeatError, match="unknown feature set 'nope'; choose one of multiscale, classical, ilastik"):
        client.fetch_features(image, tmp_path / "x.h5", "nope")
    assert not (tmp_path / "x.h5").exists()
