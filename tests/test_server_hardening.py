"""Smaller server hardening (issue 16): upload sizes that overflow int64, TLS certificate and key that do
not go together, cache entries larger than the cache, a cancellable wait for a duplicate's result, float
images near the float32 maximum, seeds and few-shot grids out of range. Each is refused in one sentence
(or handled), and the server still answers afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import h5py
import numpy as np
import pytest
from conftest import dinofeat, free_port, running_server
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import image_axes, image_sha256
from dinofeat.contract.wire import stream_checksum
from dinofeat_server.engine.stacks import FEATURE_SETS
from dinofeat_server.service.checks import check_grid, checked_seed
from dinofeat_server.service.image_store import check_layout
from dinofeat_server.service.result_cache import ResultCache
from dinofeat_server.service.security import check_certificate_pair
from dinofeat_server.service.server import start_server
from dinofeat_server.service.streaming import Cancelled
from test_connection_messages import pki  # noqa: F401 - the EC test CA and certificates, reused as a fixture


def one_sentence(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text and "Unexpected" not in text and text.endswith(".")


def refusal(call) -> grpc.RpcError:
    """The error a gRPC call (unary, or a stream read to its end) ends with."""
    with pytest.raises(grpc.RpcError) as failed:
        result = call()
        if not isinstance(result, pb.UploadImageReply):
            list(result)
    return failed.value


def upload_pieces(header: pb.UploadHeader, data: bytes):
    yield pb.UploadImageChunk(header=header)
    yield pb.UploadImageChunk(data=data)


def raw_upload(client: FeatureClient, image: np.ndarray):
    """Upload without any check on the client's side: the server's checks are under test."""
    layout = pb.ImageLayout(dtype=image.dtype.name, shape=image.shape, axes=image_axes(image))
    header = pb.UploadHeader(layout=layout, sha256=image_sha256(image))
    return client.stub.UploadImage(upload_pieces(header, np.ascontiguousarray(image, image.dtype.newbyteorder("<")).tobytes()))


def assert_still_answers(address: str) -> None:
    with FeatureClient(address) as client:
        assert "classical" in {s.name for s in client.feature_sets()}


@pytest.fixture()
def client(server_address):
    with FeatureClient(server_address) as client:
        yield client


# 1. Upload dimensions whose product overflows int64 ------------------------------------------------


@pytest.mark.parametrize("shape", [(2**32, 2**32, 2**2), (2**21, 2**21, 2**21), (2**31, 2**31, 2**2)])
def test_a_layout_whose_size_overflows_int64_is_over_the_pixel_limit(shape):
    with pytest.raises(DinofeatError, match=f"the image has {np.prod(shape, dtype=object)} samples, more than this server's limit"):
        check_layout("uint8", shape, "zyx")


def test_an_upload_whose_sides_overflow_int64_is_refused(client, server_address):
    layout = pb.ImageLayout(dtype="uint8", shape=[2**32, 2**32, 2**2], axes="zyx")
    header = pb.UploadHeader(layout=layout, sha256="0" * 64)
    error = refusal(lambda: client.stub.UploadImage(upload_pieces(header, b"\0" * 16)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "samples, more than this server's limit of" in error.details() and one_sentence(error.details())
    assert_still_answers(server_address)


# 2. TLS certificate and key that do not go together ------------------------------------------------


@pytest.fixture(scope="module")
def not_pem(tmp_path_factory):
    path = tmp_path_factory.mktemp("junk") / "server.pem"
    path.write_text("this is not a certificate\n")
    return path


def tls_pairs(pki, not_pem) -> dict[str, tuple[str, str, str]]:  # noqa: F811
    """case -> (certificate, key, words of the refusal)."""
    return {"swapped": (pki / "server_ip.key", pki / "server_ip.pem", "the TLS certificate and key are swapped"),
            "mismatched": (pki / "server_ip.pem", pki / "server_name.key", "the TLS certificate and key do not match"),
            "certificate not PEM": (not_pem, pki / "server_ip.key", "is not a PEM certificate"),
            "key not PEM": (pki / "server_ip.pem", not_pem, "is not a PEM private key")}


@pytest.mark.parametrize("case", ["swapped", "mismatched", "certificate not PEM", "key not PEM"])
def test_a_certificate_and_key_that_do_not_go_together_are_named_before_binding(pki, not_pem, case):  # noqa: F811
    cert, key, words = tls_pairs(pki, not_pem)[case]
    with pytest.raises(DinofeatError, match=words) as refused:
        check_certificate_pair(str(cert), str(key))
    assert one_sentence(str(refused.value)) and "port" not in str(refused.value)
    with pytest.raises(DinofeatError, match=words):  # start_server refuses with it, before any port or device
        asyncio.run(start_server("127.0.0.1", free_port(), "cpu", tls_cert=str(cert), tls_key=str(key)))
    check_certificate_pair(str(pki / "server_ip.pem"), str(pki / "server_ip.key"))  # the right pair passes


def test_serve_with_a_swapped_certificate_and_key_says_so(pki):  # noqa: F811
    result = dinofeat("serve", "--port", str(free_port()), "--device", "cpu", "--cache-gb", "0",
                      "--tls-cert", str(pki / "server_ip.key"), "--tls-key", str(pki / "server_ip.pem"), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "the TLS certificate and key are swapped" in lines[0] and "port" not in lines[0]


# 3. A result larger than the whole cache --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cache")
    for address in running_server("--cache-dir", str(folder), "--cache-gb", "0.001"):  # 1 MB
        yield address, folder


def test_a_result_larger_than_the_cache_streams_whole_and_leaves_the_cache_as_it_was(tiny_cache, tmp_path):
    address, folder = tiny_cache
    with FeatureClient(address) as client:
        client.fetch_features(np.full((40, 40), 7, np.uint8), tmp_path / "small.h5", "classical")  # a few kB: recorded
        before = sorted(p.name for p in folder.rglob("*.stream"))
        assert len(before) == 1
        image = (np.random.default_rng(30).random((200, 200)) * 255).astype(np.uint8)  # about 8 MB of chunks
        stages: list[str] = []
        transfer = client.fetch_features(image, tmp_path / "big.h5", "classical",
                                         progress=lambda stage, done, total: stages.append(stage))
    assert transfer.chunks_received == transfer.chunk_count == 58
    with h5py.File(tmp_path / "big.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][()], FEATURE_SETS["classical"].compute(image))
    assert sorted(p.name for p in folder.rglob("*.stream")) == before  # not recorded, nothing evicted
    assert not list(folder.rglob("*.partial"))
    assert_still_answers(address)


# 4. Waiting for a duplicate's result is cancellable ------------------------------------------------


def test_a_request_waiting_on_a_duplicate_stops_when_its_client_goes(tmp_path):
    cache = ResultCache(tmp_path, 1 << 20)
    computing, finish = threading.Event(), threading.Event()

    def slow_result():  # a whole result of no chunks: header, then trailer (the cache keeps only intact entries)
        computing.set()
        finish.wait(30)
        yield pb.DatasetStream(header=pb.DatasetHeader(name="features", chunk_count=0))
        yield pb.DatasetStream(trailer=pb.DatasetTrailer(chunk_count=0, sha256=stream_checksum([])))

    holder = threading.Thread(target=lambda: list(cache.stream("key", slow_result)), daemon=True)
    holder.start()
    assert computing.wait(10)
    cancelled, outcome = threading.Event(), []

    def duplicate() -> None:
        try:
            list(cache.stream("key", slow_result, cancelled))
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")

    waiter = threading.Thread(target=duplicate, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not outcome  # it waits for the first request's result
    cancelled.set()  # its client gave up
    started = time.monotonic()
    waiter.join(1.0)
    assert not waiter.is_alive() and outcome == ["cancelled"] and time.monotonic() - started < 1.0
    finish.set()
    holder.join(10)
    assert not holder.is_alive() and cache.read("key") is not None  # the first request's result was recorded


# 5. Float images near the float32 maximum, and NaN or infinity ---------------------------------------


@pytest.fixture(scope="module")
def huge_floats() -> np.ndarray:
    rng = np.random.default_rng(31)
    image = (rng.random((70, 60)) * 3e38).astype(np.float32)
    image[:10] *= -1  # both signs
    image[0, 0] = np.finfo(np.float32).max
    return image


@pytest.mark.parametrize("name", ["classical", "multiscale"])
def test_float_images_near_the_float32_maximum_give_finite_features(name, huge_floats):
    features = FEATURE_SETS[name].compute(huge_floats)
    assert np.isfinite(features).all()
    assert features.std(axis=(1, 2)).max() > 0  # not flattened to a constant
    from dinofeat_server.engine.space import fixed_range

    assert fixed_range([huge_floats]) == (0.0, 2.0**128)  # brought within +-1 by a power of two
    assert fixed_range([np.float32([[0, 2**40], [-(2**40), 1]])]) == (0.0, 1.0)  # floats within reach are kept as they are


def test_a_request_for_a_float_image_near_the_float32_maximum_gives_finite_features(client, huge_floats, tmp_path):
    client.fetch_features(huge_floats, tmp_path / "huge.h5", "multiscale")
    with h5py.File(tmp_path / "huge.h5", "r") as f:
        features = f["features"][()]
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features, FEATURE_SETS["multiscale"].compute(huge_floats), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_an_uploaded_image_with_nan_or_infinity_is_refused(client, server_address, value):
    image = np.random.default_rng(33).random((40, 40)).astype(np.float32)
    image[5, 7] = value
    error = refusal(lambda: raw_upload(client, image))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite values" in error.details() and one_sentence(error.details())
    assert_still_answers(server_address)


# 6. Seeds and few-shot grids ----------------------------------------------------------------------


def test_seeds_outside_0_to_2_32_are_refused():
    assert checked_seed(0) == 0 and checked_seed(2**32 - 1) == 2**32 - 1
    for seed in (-1, 2**32, 2**63 - 1, -(2**63)):
        with pytest.raises(DinofeatError, match=f"the seed must be between 0 and 4294967295, not {seed}") as refused:
            checked_seed(seed)
        assert one_sentence(str(refused.value))


def test_a_grid_and_window_a_support_image_is_too_small_for_are_refused():
    check_grid(4, 4, [np.zeros((13, 40)), np.zeros((40, 13, 3)), np.zeros((2, 13, 13))])
    check_grid(64, 1, [np.zeros((40, 40))])  # one cell, one-cell window: works
    check_grid(10, 4, [np.zeros((40, 40))])
    for grid, window, shape, cells in ((64, 4, (40, 40), "1 x 1"), (4, 4, (12, 40), "3 x 10"), (11, 4, (40, 33), "4 x 3"),
                                       (4, 4, (3, 12, 12), "3 x 3"), (4, 4, (12, 12, 3), "3 x 3")):
        with pytest.raises(DinofeatError, match=f"gives only {cells} grid cells of {grid} pixels, fewer than the pooling "
                                                f"window of {window} x {window} cells") as refused:
            check_grid(grid, window, [np.zeros((400, 400)), np.zeros(shape)])
        assert one_sentence(str(refused.value)) and "support image 2" in str(refused.value)


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray]:
    image = (np.random.default_rng(34).random((40, 40)) * 255).astype(np.uint8)
    labels = np.zeros((40, 40), np.uint8)
    labels[:5], labels[-5:] = 1, 2
    return image, labels


# needs servicer wiring: Segment, Train and Analyse call checked_seed(request.seed)
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_0_to_2_32_is_invalid_argument(client, server_address, labelled, seed):
    image, labels = labelled
    sha, labels_sha = client.upload(image), client.upload(labels)
    calls = {"Segment": lambda: client.stub.Segment(pb.SegmentRequest(image_sha256=sha, labels_sha256=labels_sha,
                                                                      feature_set="classical", trees=2, seed=seed)),
             "Train": lambda: client.stub.Train(pb.TrainRequest(image_sha256=[sha], labels_sha256=[labels_sha],
                                                                feature_set="classical", trees=2, seed=seed)),
             "Analyse": lambda: client.stub.Analyse(pb.AnalyseRequest(image_sha256=sha, feature_set="classical",
                                                                      analysis="kmeans", clusters=2, seed=seed))}
    for method, call in calls.items():
        error = refusal(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
        assert f"the seed must be between 0 and 4294967295, not {seed}" in error.details() and one_sentence(error.details())
    assert_still_answers(server_address)


# needs servicer wiring: FewShot calls check_grid(grid, window, supports)
@pytest.mark.parametrize(("size", "grid"), [(40, 64), (12, 0)])  # a grid larger than the image; defaults on a small support
def test_a_few_shot_grid_the_support_is_too_small_for_is_invalid_argument(client, server_address, labelled, size, grid):
    image = labelled[0][:size, :size]
    mask = np.zeros(image.shape, np.uint8)
    mask[2:8, 2:8] = 1
    request = pb.FewShotRequest(support_sha256=[client.upload(image)], support_mask_sha256=[client.upload(mask)],
                                query_sha256=client.upload(labelled[0]), feature_set="classical", grid=grid)
    error = refusal(lambda: client.stub.FewShot(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "fewer than the pooling window of 4 x 4 cells" in error.details() and one_sentence(error.details())
    assert_still_answers(server_address)
