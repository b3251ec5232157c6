"""What makes streaming fast, as a contract: several chunks per message for clients that ask, single chunks
for older clients that do not, the same bytes either way (bench/bench_stream.py measures the speed).
"""

from __future__ import annotations

import grpc
import h5py
import numpy as np
import pytest
from conftest import noise
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat.contract.chunk_batches import BATCH_BYTES, CHUNK_BATCHES, chunks_of


def streamed(address: str, sha: str, metadata: tuple = ()) -> list[pb.DatasetStream]:
    """Every message of a raw-feature request for the image `sha`, read straight from the stub."""
    with grpc.insecure_channel(address) as channel:
        request = pb.ComputeFeaturesRequest(image_sha256=sha, feature_set="classical", encoding=pb.Encoding(compression="none"))
        return list(pb_grpc.FeatureServiceStub(channel).ComputeFeatures(request, metadata=metadata))


def test_a_client_that_asks_gets_batches_under_the_limit_and_an_older_one_single_chunks(inprocess_server):
    with inprocess_server.client() as client:
        sha = client.upload(noise(1, 512))
    batched = streamed(inprocess_server.address, sha, (CHUNK_BATCHES,))
    single = streamed(inprocess_server.address, sha)
    batches = [m for m in batched if m.WhichOneof("message") == "chunks"]
    assert batches and all(len(m.chunks.chunks) > 1 for m in batches)
    assert all(m.chunks.data_bytes == sum(len(c.data) for c in m.chunks.chunks) <= BATCH_BYTES for m in batches)
    assert {m.WhichOneof("message") for m in single} == {"header", "progress", "chunk", "trailer"}
    assert [(c.index, c.data) for m in batched for c in chunks_of(m)] == [(c.index, c.data) for m in single for c in chunks_of(m)]
    assert batched[-1].trailer.sha256 == single[-1].trailer.sha256


def test_raw_and_gzip_batched_streams_write_the_same_features(inprocess_server, tmp_path):
    image = noise(2, 300)
    with inprocess_server.client() as client:
        client.fetch_features(image, tmp_path / "raw.h5", "classical", compression="none")
        client.fetch_features(image, tmp_path / "gzip.h5", "classical")
    with h5py.File(tmp_path / "raw.h5") as raw, h5py.File(tmp_path / "gzip.h5") as packed:
        assert raw["features"].shape == (58, 300, 300)
        np.testing.assert_array_equal(raw["features"][()], packed["features"][()])


def test_a_chunk_whose_crc_differs_from_the_servers_is_refused_in_one_sentence(tmp_path):
    from dinofeat_client.dataset_file import DatasetFile
    from dinofeat.contract.errors import DinofeatError
    from dinofeat.contract.wire import feature_layout

    target = DatasetFile(tmp_path / "f.h5", "key")
    target.open(feature_layout("features", (1, 256, 256), "none"), {}, False)
    data = bytes(256 * 256 * 4)
    try:
        with pytest.raises(DinofeatError, match=r"^a chunk arrived damaged \(its CRC-32 differs from the server's\); run the same command"):
            target.write_chunk((0, 0, 0), data, 0, sha256=b"\0" * 32, crc32=12345)
    finally:
        target.discard()
