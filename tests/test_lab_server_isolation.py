"""What one client can and cannot do to a shared server: real `dinofeat serve` processes on loopback,
clients that stop reading or sending, lie about who they are, or upload too much."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, dinofeat, noise, wait_for
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat_client.client import FeatureClient
from dinofeat.contract.images import image_sha256
from dinofeat_client.image_files import write_tiff


def token_file(folder: Path, lines: list[str]) -> Path:
    path = folder / "tokens.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def rows(status: pb.StatusReply) -> dict[str, pb.ClientUse]:
    return {row.client: row for row in status.clients}


def unread_stream(address: str, sha: str, token: str | None = None) -> tuple[grpc.Channel, object]:
    """A feature stream that is started and then never read (its own connection)."""
    channel = grpc.insecure_channel(address)
    call = pb_grpc.FeatureServiceStub(channel).ComputeFeatures(
        pb.ComputeFeaturesRequest(image_sha256=sha, feature_set="classical"), metadata=bearer(token))
    return channel, call


class StalledUpload:
    """An upload that sends its header and half its bytes, then nothing (until `release`)."""

    def __init__(self, address: str, shape: tuple[int, int], token: str | None = None):
        self.release = threading.Event()
        self.channel = grpc.insecure_channel(address)
        data = bytes(shape[0] * shape[1])

        def pieces():
            layout = pb.ImageLayout(dtype="uint8", shape=shape, axes="yx")
            yield pb.UploadImageChunk(header=pb.UploadHeader(layout=layout, sha256="0" * 64))
            for start in range(0, len(data) // 2, 1 << 20):
                yield pb.UploadImageChunk(data=data[start : min(start + (1 << 20), len(data) // 2)])
            self.release.wait(120)

        self.future = pb_grpc.FeatureServiceStub(self.channel).UploadImage.future(pieces(), metadata=bearer(token))

    def error(self, seconds: float = 60) -> grpc.RpcError:
        try:
            self.future.result(timeout=seconds)
        except grpc.RpcError as error:
            return error
        pytest.fail("the stalled upload succeeded")

    def close(self) -> None:
        self.release.set()
        self.future.cancel()
        self.channel.close()


def test_a_client_that_stops_reading_frees_its_worker_after_the_stall(tmp_path):
    server = ServerProcess("--workers", "1", "--stall-seconds", "2",
                           "--token-file", str(token_file(tmp_path, ["staller token-of-the-staller", "other token-of-the-other"])))
    write_tiff(tmp_path / "small.tif", noise(2, 64))
    try:
        with FeatureClient(server.address, token="token-of-the-staller") as staller:
            sha = staller.upload(noise(1, 512))  # 61 MB of features: far more than the connection buffers
            channel, call = unread_stream(server.address, sha, "token-of-the-staller")
            wait_for(lambda: staller.status().running == 1, what="the unread stream computing")
            started = time.monotonic()
            other = dinofeat("features", "--server", server.address, str(tmp_path / "small.tif"), "-o", str(tmp_path / "small.h5"),
                             "--quiet", env={"DINOFEAT_TOKEN": "token-of-the-other"})
            waited = time.monotonic() - started
            assert other.returncode == 0, other.stderr
            assert waited < 45, f"the small request waited {waited:.0f} s behind a client that reads nothing"
            wait_for(lambda: staller.status().running == 0, seconds=10, what="the stalled stream ended")  # the small one ran beside it
            status = staller.status()
            assert (rows(status)["staller"].stalled, rows(status)["other"].finished) == (1, 1)
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stall_seconds" in ended.value.details()
            channel.close()
            assert staller.health().version  # the server still answers
    finally:
        server.stop()


def test_uploads_that_stop_sending_hold_only_their_reservation_and_end_after_the_stall(tmp_path):
    """Each client's uploads in flight are bounded (client_upload_gb) and visible in status; one that
    stops sending ends after stall_seconds and gives its memory back; another client uploads meanwhile."""
    server = ServerProcess("--stall-seconds", "6", "--client-upload-gb", "0.04",
                           "--token-file", str(token_file(tmp_path, ["hoarder token-of-the-hoarder", "other token-of-the-other"])))
    uploads = []
    try:
        baseline = server.rss_bytes()
        uploads = [StalledUpload(server.address, (4096, 4096), "token-of-the-hoarder") for _ in range(2)]  # 16.8 MB each
        with FeatureClient(server.address, token="token-of-the-other") as other:
            wait_for(lambda: rows(other.status()).get("hoarder", pb.ClientUse()).upload_bytes == 2 * 4096 * 4096,
                     what="two uploads in flight")
            growth = server.rss_bytes() - baseline
            third = StalledUpload(server.address, (4096, 4096), "token-of-the-hoarder")
            uploads.append(third)
            refused = third.error()
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "client_upload_gb" in refused.details()
            assert other.upload(noise(3, 2048)) == image_sha256(noise(3, 2048))  # another client is not held back
            for upload in uploads[:2]:
                ended = upload.error()
                assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stall_seconds" in ended.details()
            status = other.status()
        assert growth < 2 * 4096 * 4096 + (48 << 20), f"the server grew {growth / 1e6:.0f} MB for 34 MB of half-sent uploads"
        assert status.upload_bytes == 0 and rows(status)["hoarder"].stalled == 2 and rows(status)["hoarder"].refused == 1
    finally:
        for upload in uploads:
            upload.close()
        server.stop()


def test_made_up_tokens_and_new_connections_do_not_make_a_new_client(tmp_path):
    """Without tokens a client is its IP address: a different authorization header on each stream, on a
    new connection each time, still counts against the same per-client limit."""
    server = ServerProcess("--workers", "1", "--max-streams-per-client", "1", "--stall-seconds", "60")
    try:
        with FeatureClient(server.address) as client:
            sha = client.upload(noise(1, 1024))
            small = client.upload(noise(2, 64))
            channel, call = unread_stream(server.address, sha, "made-up-1")
            wait_for(lambda: client.status().running == 1, what="the first stream computing")
            for number in range(2, 5):
                with grpc.insecure_channel(server.address) as other:
                    with pytest.raises(grpc.RpcError) as refused:
                        for _ in pb_grpc.FeatureServiceStub(other).ComputeFeatures(
                                pb.ComputeFeaturesRequest(image_sha256=small, feature_set="classical"),
                                metadata=bearer(f"made-up-{number}")):
                            pass
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "already has 1 requests or uploads open" in refused.value.details()
            call.cancel()
            channel.close()
            status = client.status()
        printed = dinofeat("status", "--server", server.address).stdout
        assert [row.client for row in status.clients] == ["127.0.0.1"] and status.clients[0].refused == 3
        assert [line.split()[7] for line in printed.splitlines() if line.strip().startswith("127.0.0.1")] == ["3"], printed
    finally:
        server.stop()


def test_clients_are_named_by_their_tokens_and_logs_carry_no_plain_token_hash(tmp_path):
    unnamed = "an-unnamed-token-0123"
    server = ServerProcess("--token-file", str(token_file(tmp_path, ["# lab", "alice token-of-alice-for-tests", unnamed])))
    try:
        for token in ("token-of-alice-for-tests", unnamed):
            with FeatureClient(server.address, token=token) as client:
                client.fetch_features(noise(1, 64), tmp_path / "f.h5")
        with FeatureClient(server.address, token="token-of-alice-for-tests") as client:
            names = sorted(rows(client.status()))
    finally:
        server.stop()
    keyed = [name for name in names if name != "alice"]
    assert names[0] == "alice" and len(keyed) == 1 and keyed[0].startswith("token-") and len(keyed[0]) == len("token-") + 12
    plain = hashlib.sha256(unnamed.encode()).hexdigest()
    assert keyed[0][len("token-"):] not in plain
    for secret in (unnamed, "token-of-alice-for-tests", plain[:8], hashlib.sha256(f"Bearer {unnamed}".encode()).hexdigest()[:8]):
        assert secret not in server.log
    assert '"client": "alice"' in server.log and f'"client": "{keyed[0]}"' in server.log


def test_sighup_reloads_the_token_file_and_a_broken_file_refuses_every_token_until_fixed(tmp_path):
    tokens = token_file(tmp_path, ["alice token-of-alice-for-tests"])
    server = ServerProcess("--token-file", str(tokens))
    try:
        def accepted(token: str) -> bool:
            with grpc.insecure_channel(server.address) as channel:
                try:
                    pb_grpc.FeatureServiceStub(channel).Status(pb.StatusRequest(), metadata=bearer(token), timeout=10)
                    return True
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    return False

        assert accepted("token-of-alice-for-tests") and not accepted("token-of-bob-for-tests")
        tokens.write_text("bob token-of-bob-for-tests\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: accepted("token-of-bob-for-tests"), 10, "bob's token accepted after SIGHUP")
        assert not accepted("token-of-alice-for-tests")
        tokens.write_text("# nothing here\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "REFUSING EVERY TOKEN" in server.log, 10, "the broken file reported")
        assert not accepted("token-of-bob-for-tests")
        tokens.write_text("bob token-of-bob-for-tests\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: accepted("token-of-bob-for-tests"), 10, "bob's token accepted once the file is fixed")
    finally:
        server.stop()


def test_finishing_a_large_upload_does_not_stop_the_server_answering(tmp_path):
    """Converting and hashing an upload run off the event loop: other calls are answered meanwhile."""
    server = ServerProcess()
    image = np.random.default_rng(0).random((8192, 8192), dtype=np.float32)  # 256 MiB
    latencies, done = [], threading.Event()

    def ping() -> None:
        with FeatureClient(server.address) as pinger:
            while not done.is_set():
                started = time.monotonic()
                pinger.health()
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    try:
        pinger = threading.Thread(target=ping)
        pinger.start()
        with FeatureClient(server.address) as client:
            client.upload(image)
        done.set()
        pinger.join()
    finally:
        done.set()
        server.stop()
    assert max(latencies) < 1.0, f"a health check waited {max(latencies):.2f} s while an upload finished"


def test_the_limits_are_visible_in_status():
    server = ServerProcess("--stall-seconds", "7", "--client-upload-gb", "0.5")
    try:
        with FeatureClient(server.address) as client:
            status = client.status()
    finally:
        server.stop()
    limits = json.loads(status.limits_json)
    assert (limits["stall_seconds"], limits["client_upload_gb"], limits["max_streams_per_client"]) == (7, 0.5, 8)
