"""Lab-server security on loopback: bearer tokens, TLS with a CA made here, mutual TLS, refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import dinofeat, free_port, running_server
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError

TOKEN = "s3cret-token-for-tests"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=dinofeat test CA", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem",
                "-days", "2", "-extfile", "san.ext", cwd=folder)
    (folder / "tokens").write_text(f"# lab tokens\n{TOKEN}\n\n")
    (folder / "client_token").write_text(TOKEN + "\n")
    (folder / "wrong_token").write_text("not-the-token-of-this-server\n")
    return folder


@pytest.fixture(scope="module")
def protected_server(pki) -> str:
    yield from running_server("--token-file", str(pki / "tokens"), "--tls-cert", str(pki / "server.pem"),
                              "--tls-key", str(pki / "server.key"))


@pytest.fixture(scope="module")
def mutual_tls_server(pki) -> str:
    yield from running_server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                              "--tls-client-ca", str(pki / "ca.pem"))


def test_tls_round_trip_with_the_right_token(protected_server, pki, tmp_path):
    image = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    with FeatureClient(protected_server, token=TOKEN, tls_ca=str(pki / "ca.pem")) as client:
        transfer = client.fetch_features(image, tmp_path / "f.h5")
    assert transfer.chunk_count == 53 and (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("token", [None, "not-the-token", TOKEN + "x"])
def test_missing_or_wrong_token_is_unauthenticated(protected_server, pki, token):
    with FeatureClient(protected_server, token=token, tls_ca=str(pki / "ca.pem")) as client:
        with pytest.raises(DinofeatError, match="refused the request: missing or wrong token") as refused:
            client.feature_sets()
    assert TOKEN not in str(refused.value)


def test_streaming_calls_are_refused_without_a_token_too(protected_server, pki, tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((30, 30), np.uint8))
    result = dinofeat("features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "f.h5"), "--server", protected_server,
                      "--tls-ca", str(pki / "ca.pem"), "--token-file", str(pki / "wrong_token"))
    assert result.returncode == 1 and "missing or wrong token" in result.stderr and not (tmp_path / "f.h5").exists()
    ok = dinofeat("sets", "--server", protected_server, "--tls-ca", str(pki / "ca.pem"), "--token-file", str(pki / "client_token"))
    assert ok.returncode == 0 and "classical" in ok.stdout


def test_a_client_without_the_ca_cannot_connect(protected_server):
    with pytest.raises(DinofeatError, match="cannot reach a dinofeat server"):
        FeatureClient(protected_server, token=TOKEN, connect_timeout_s=3)


def test_mutual_tls_needs_a_client_certificate(mutual_tls_server, pki):
    with FeatureClient(mutual_tls_server, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"),
                       tls_key=str(pki / "client.key")) as client:
        assert {s.name for s in client.feature_sets()} >= {"classical"}
    with pytest.raises(DinofeatError, match="cannot reach"):
        FeatureClient(mutual_tls_server, tls_ca=str(pki / "ca.pem"), connect_timeout_s=3)


def test_non_loopback_needs_both_token_and_tls(pki, tmp_path):
    only_token = dinofeat("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--token-file", str(pki / "tokens"))
    assert only_token.returncode == 1 and "without a token and TLS" in only_token.stderr
    half_tls = dinofeat("serve", "--port", str(free_port()), "--tls-cert", str(pki / "server.pem"))
    assert half_tls.returncode == 1 and "TLS needs both --tls-cert and --tls-key" in half_tls.stderr
    (tmp_path / "empty").write_text("# nothing\n")
    empty = dinofeat("serve", "--port", str(free_port()), "--token-file", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "holds no token" in empty.stderr


def test_standard_health_service_answers_serving(server_address):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dinofeat.v1.FeatureService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_status_shows_loaded_models_and_finished_requests(deep_server_address, tmp_path):
    image = (np.random.default_rng(3).random((40, 40)) * 255).astype(np.uint8)
    with FeatureClient(deep_server_address) as client:
        client.fetch_features(image, tmp_path / "d.h5", "dinov2", preset="fast")
        status = client.status()
    assert "dinov2_vits14" in status.loaded_models and status.finished >= 1 and status.running == 0
    assert status.device == "cpu" and status.images_held >= 1
    printed = dinofeat("status", "--server", deep_server_address)
    assert printed.returncode == 0 and "loaded models     dinov2_vits14" in printed.stdout


def test_every_streaming_call_leaves_one_json_log_line(caplog, tmp_path):
    import json
    import logging

    from dinofeat_server.service.server import EmbeddedServer

    image = (np.random.default_rng(4).random((30, 30)) * 255).astype(np.uint8)
    with caplog.at_level(logging.INFO, logger="dinofeat.requests"):
        with EmbeddedServer("cpu") as address, FeatureClient(address, token=None) as client:
            client.fetch_features(image, tmp_path / "f.h5")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dinofeat.requests"]
    assert len(lines) == 1 and lines[0]["method"] == "feature_stream" and lines[0]["outcome"] == "ok"
    assert lines[0]["bytes"] > 0 and lines[0]["peer"].startswith("ipv")
