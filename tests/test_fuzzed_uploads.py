"""Malformed and fuzzed uploads, straight to the UploadImage RPC of a real server: one clear
INVALID_ARGUMENT sentence each, and the server keeps serving."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def stub(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield pb_grpc.FeatureServiceStub(channel)


def upload(stub, dtype: str, shape: list[int], axes: str, data: bytes, sha256: str = "", pieces: int = 1) -> grpc.RpcError | None:
    header = pb.UploadImageChunk(header=pb.UploadHeader(layout=pb.ImageLayout(dtype=dtype, shape=shape, axes=axes),
                                                         sha256=sha256 or hashlib.sha256(data).hexdigest()))
    step = max(1, -(-len(data) // pieces))
    messages = [header, *(pb.UploadImageChunk(data=data[i : i + step]) for i in range(0, len(data), step))]
    try:
        stub.UploadImage(iter(messages), timeout=30)
    except grpc.RpcError as error:
        return error
    return None


def assert_one_sentence(error: grpc.RpcError | None) -> None:
    assert error is not None, "the malformed upload was accepted"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    message = error.details()
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message and len(message) < 300


def assert_still_serving(stub) -> None:
    assert stub.Health(pb.HealthRequest(), timeout=10).version


def test_a_header_claiming_100000_by_100000_pixels_is_refused_before_any_bytes(stub):
    error = upload(stub, "uint16", [100000, 100000], "yx", b"\0" * 1000)
    assert_one_sentence(error)
    assert "more than this server's limit" in error.details()
    assert_still_serving(stub)


def test_fewer_bytes_than_the_layout_needs_are_refused(stub):
    error = upload(stub, "uint8", [64, 64], "yx", b"\1" * 4000)
    assert_one_sentence(error)
    assert "4000 bytes but its layout needs 4096" in error.details()


def test_more_bytes_than_the_layout_announces_are_refused(stub):
    error = upload(stub, "uint8", [8, 8], "yx", b"\1" * 200, pieces=4)
    assert_one_sentence(error)
    assert "more than the 64 bytes" in error.details()


def test_bytes_that_do_not_match_their_checksum_are_refused(stub):
    error = upload(stub, "uint8", [8, 8], "yx", b"\1" * 64, sha256="0" * 64)
    assert_one_sentence(error)
    assert "does not match its sha256" in error.details()


def test_data_before_the_header_is_refused(stub):
    try:
        stub.UploadImage(iter([pb.UploadImageChunk(data=b"abc")]), timeout=10)
        error = None
    except grpc.RpcError as caught:
        error = caught
    assert_one_sentence(error)
    assert "must start with its header" in error.details()


DTYPES = st.sampled_from(["uint8", "uint16", "float32", "float64", "int64", "complex64", "bool", "", "<f4", "uint8; DROP"])
AXES = st.sampled_from(["yx", "yxc", "zyx", "zyxc", "xy", "", "c", "tzyxc"])
SHAPES = st.lists(st.integers(min_value=-3, max_value=300), min_size=0, max_size=5)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=DTYPES, shape=SHAPES, axes=AXES, data=st.binary(max_size=4096), pieces=st.integers(1, 4),
       honest_checksum=st.booleans())
def test_random_layouts_and_bytes_get_one_sentence_or_are_stored(stub, dtype, shape, axes, data, pieces, honest_checksum):
    error = upload(stub, dtype, shape, axes, data, "" if honest_checksum else hashlib.sha256(b"x" + data).hexdigest(), pieces)
    if error is not None:
        assert_one_sentence(error)
    else:  # a consistent random image is fine: the server must hold exactly it
        image = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        assert image.size and np.isfinite(image.astype(np.float64)).all()
    assert_still_serving(stub)
