"""Chunks encoded by the wire format are what HDF5 itself stores: h5py reads them back exactly."""

from __future__ import annotations

import json
import zlib

import h5py
import numpy as np
import pytest
from dinofeat_client.dataset_file import DatasetFile
from dinofeat.contract.wire import axistags, encode_chunk, feature_layout, iter_chunks


def written_by_stream(path, data: np.ndarray, compression: str) -> None:
    layout = feature_layout("features", data.shape, compression)
    target = DatasetFile(path, key="k")
    target.open(layout, {"channel_names": ["a", "b", "c"]}, resume=False)
    for _, offset, piece in iter_chunks(data, (0,) * data.ndim, layout):
        target.write_chunk(offset, encode_chunk(piece, layout), 0)
    target.close()


@pytest.mark.parametrize("compression", ("gzip", "none"))
def test_direct_chunks_read_back_equal_including_edge_chunks(tmp_path, compression):
    data = np.random.default_rng(0).random((3, 300, 270)).astype(np.float32)
    written_by_stream(tmp_path / "f.h5", data, compression)
    with h5py.File(tmp_path / "f.h5.partial", "r") as f:
        ds = f["features"]
        assert ds.chunks == (1, 256, 256)
        assert ds.compression == ("gzip" if compression == "gzip" else None)
        assert ds.shuffle == (compression == "gzip")
        np.testing.assert_array_equal(ds[()], data)


def test_gzip_chunk_is_a_zlib_stream_of_byte_shuffled_little_endian_samples():
    data = np.random.default_rng(1).random((1, 256, 256)).astype(np.float32)
    layout = feature_layout("features", data.shape, "gzip", 1)
    unpacked = np.frombuffer(zlib.decompress(encode_chunk(data, layout)), np.uint8)
    planes = unpacked.reshape(4, -1)  # HDF5 shuffle: all first bytes, then all second bytes, ...
    np.testing.assert_array_equal(planes.T.copy().view("<f4").reshape(data.shape), data)


def test_h5py_stores_its_own_gzip_chunks_in_the_same_format(tmp_path):
    data = np.random.default_rng(1).random((1, 256, 256)).astype(np.float32)
    layout = feature_layout("features", data.shape, "gzip", 1)
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        f.create_dataset("features", data=data, **{k: v for k, v in layout.h5py_options().items() if k not in ("shape", "dtype")})
        _, stored = f["features"].id.read_direct_chunk((0, 0, 0))
    assert zlib.decompress(stored) == zlib.decompress(encode_chunk(data, layout))


def test_chunk_indices_are_row_major_over_the_chunk_grid():
    layout = feature_layout("features", (2, 600, 300))
    assert layout.grid == (2, 3, 2) and layout.chunk_count == 12
    assert layout.chunk_offset(0) == (0, 0, 0)
    assert layout.chunk_offset(7) == (1, 0, 256)
    assert all(layout.chunk_index(layout.chunk_offset(i)) == i for i in range(12))


def test_small_images_get_chunks_no_larger_than_the_image():
    assert feature_layout("features", (5, 100, 40)).chunk_shape == (1, 100, 40)
    assert feature_layout("features", (5, 7, 300, 300)).chunk_shape == (1, 1, 256, 256)


def test_axistags_are_vigra_json_in_disk_order():
    tags = json.loads(axistags("czyx"))
    assert [a["key"] for a in tags["axes"]] == ["c", "z", "y", "x"]
    assert [a["typeFlags"] for a in tags["axes"]] == [1, 2, 2, 2]
    assert set(tags["axes"][0]) == {"key", "typeFlags", "resolution", "description"}


def test_partial_file_reports_its_missing_chunks(tmp_path):
    data = np.zeros((2, 300, 300), np.float32)
    layout = feature_layout("features", data.shape)
    target = DatasetFile(tmp_path / "f.h5", key="abc")
    target.open(layout, {}, resume=False)
    for index, offset, piece in iter_chunks(data, (0, 0, 0), layout):
        if index in (0, 5):
            target.write_chunk(offset, encode_chunk(piece, layout), 0)
    target.close()
    assert DatasetFile(tmp_path / "f.h5", key="abc").resumable_indices() == [1, 2, 3, 4, 6, 7]
    assert DatasetFile(tmp_path / "f.h5", key="other").resumable_indices() is None
