"""A first connection that cannot work says why within a second or two, in one sentence: nothing listening,
a name that does not resolve, a TLS mismatch either way, a certificate not signed by --tls-ca or not made out
to the address, a missing client certificate. Failures that may pass are retried with one line each."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import ServerProcess, dinofeat, free_port
from dinofeat_client.client import FeatureClient
from dinofeat_client.connection import connection_problem
from dinofeat.contract.errors import DinofeatError

FAST_S = 5.0
"""A refused or mismatched connection is reported within this long (the command's start included)."""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Two CAs; certificates from the first: server_name (for localhost only), server_ip (127.0.0.1), client."""
    folder = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=folder)
    for name, names in (("server_name", "DNS:localhost"), ("server_ip", "IP:127.0.0.1"), ("client", "DNS:client")):
        (folder / f"{name}.ext").write_text(f"subjectAltName={names}\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem",
                "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def tls_server(pki):
    """A TLS server whose certificate names localhost (not 127.0.0.1)."""
    server = ServerProcess("--tls-cert", str(pki / "server_name.pem"), "--tls-key", str(pki / "server_name.key"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "image.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    return path


def refused_quickly(*args: str) -> str:
    """Run the command line, expecting exit 1 with one `dinofeat: error:` line within FAST_S; returns that line."""
    started = time.monotonic()
    result = dinofeat(*args, timeout=60)
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dinofeat: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < FAST_S, f"took {elapsed:.1f} s: {result.stderr}"
    return lines[0]


def test_nothing_listening_is_said_at_once(image, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    line = refused_quickly("features", str(image), "-o", str(tmp_path / "f.h5"), "--server", address)
    assert line == (f"dinofeat: error: cannot reach a dinofeat server at {address}: nothing listens there (connection refused); "
                    "start one with `dinofeat serve`, check the host:port, or leave out --server to use an embedded one.")
    assert not (tmp_path / "f.h5").exists()
    assert "nothing listens there" in refused_quickly("status", "--server", f"localhost:{free_port()}")


def test_a_name_that_does_not_resolve_is_named():
    line = refused_quickly("status", "--server", "no-such-host.invalid:50051")
    assert "the host name no-such-host.invalid does not resolve; check the host:port" in line


def test_a_plaintext_client_is_told_the_server_speaks_tls(tls_server, image, tmp_path):
    line = refused_quickly("features", str(image), "-o", str(tmp_path / "f.h5"), "--server", tls_server.address)
    assert line == (f"dinofeat: error: cannot reach a dinofeat server at {tls_server.address} without TLS: the server there "
                    "speaks TLS; pass --tls-ca CA.pem (the CA that signed its certificate).")
    assert "`dinofeat serve`" not in line and not (tmp_path / "f.h5").exists()


def test_a_tls_client_is_told_the_server_does_not_speak_tls(server_address, pki):
    line = refused_quickly("status", "--server", server_address, "--tls-ca", str(pki / "ca.pem"))
    assert line.endswith(f"at {server_address} over TLS: the server there does not speak TLS; drop --tls-ca, "
                         "or start the server with --tls-cert and --tls-key.")


def test_a_certificate_from_another_ca_is_named(tls_server, pki):
    other = pki / "other_ca.pem"
    line = refused_quickly("status", "--server", f"localhost:{tls_server.port}", "--tls-ca", str(other))
    assert f"over TLS: its certificate is not signed by --tls-ca {other}; pass --tls-ca with the CA that signed" in line


def test_a_certificate_for_another_name_is_named(tls_server, pki):
    line = refused_quickly("status", "--server", tls_server.address, "--tls-ca", str(pki / "ca.pem"))
    assert "over TLS: its certificate is not made out to 127.0.0.1; connect by a name or address the certificate lists" in line


def test_the_right_ca_connects(tls_server, pki):
    result = dinofeat("status", "--server", f"localhost:{tls_server.port}", "--tls-ca", str(pki / "ca.pem"), timeout=60)
    assert result.returncode == 0 and "dinofeat server" in result.stdout and not result.stderr, result.stderr


def test_a_missing_or_foreign_client_certificate_is_named(pki):
    server = ServerProcess("--tls-cert", str(pki / "server_ip.pem"), "--tls-key", str(pki / "server_ip.key"),
                           "--tls-client-ca", str(pki / "other_ca.pem"))
    try:
        started = time.monotonic()
        with pytest.raises(DinofeatError, match="without a client certificate: the server asks for one; pass --tls-cert and --tls-key"):
            FeatureClient(server.address, tls_ca=str(pki / "ca.pem"))
        with pytest.raises(DinofeatError, match="with the client certificate .*client.pem: the server does not accept it"):
            FeatureClient(server.address, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
        assert time.monotonic() - started < FAST_S
    finally:
        server.stop()


def test_a_silent_listener_is_announced_then_given_up_on():
    """A host that accepts but never answers (or drops packets) is waited for, with a line saying so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        heard: list[str] = []
        started = time.monotonic()
        with pytest.raises(DinofeatError, match=f"at {address}: no answer within 3 s; check the host:port"):
            FeatureClient(address, connect_timeout_s=3, notify=heard.append)
        assert 2.5 < time.monotonic() - started < 5
    assert heard == [f"no answer yet from the server at {address}; waiting up to 3 s."]


def test_a_failure_that_may_pass_is_retried_with_a_line_each():
    """A listener that closes every connection unanswered (not TLS either) is tried again, announced each time."""
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(8)

    def close_each():
        while True:
            try:
                connection, _ = closer.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=close_each, daemon=True).start()
    address = f"127.0.0.1:{closer.getsockname()[1]}"
    heard: list[str] = []
    try:
        with pytest.raises(DinofeatError, match=f"cannot reach a dinofeat server at {address} \\(.+\\); check the host:port"):
            FeatureClient(address, connect_timeout_s=2.5, notify=heard.append)
    finally:
        closer.close()
    assert len(heard) >= 2 and all(h.startswith(f"cannot reach the server at {address} yet (") and "); trying again in " in h
                                   for h in heard), heard  # grpc says "Socket closed" or "...Connection reset by peer..."


@pytest.mark.parametrize("address, details, tls, expected", [
    ("127.0.0.1:1", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote "
     "host: Connection refused", False, "nothing listens there (connection refused)"),
    ("nowhere.invalid:1", "DNS resolution failed for nowhere.invalid:1: C-ares status is not ARES_SUCCESS qtype=A "
     "name=nowhere.invalid is_balancer=0: Domain name not found", False, "the host name nowhere.invalid does not resolve"),
    ("192.0.2.1:1", "failed to connect to all addresses; last error: UNKNOWN: ipv4:192.0.2.1:1: Failed to connect to remote "
     "host: getsockopt(SO_ERROR): Network is unreachable", False, "no route to 192.0.2.1 (network is unreachable)"),
    ("192.0.2.1:1", "failed to connect to all addresses; last error: UNKNOWN: ipv4:192.0.2.1:1: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid "
     "certificate verification context: OK", True, "over TLS: the server there does not speak TLS"),
    ("192.0.2.1:1", "failed to connect to all addresses; last error: UNKNOWN: ipv4:192.0.2.1:1: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
     "certificate has expired: OK", True, "the server's certificate has expired"),
    ("192.0.2.1:1", "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:192.0.2.1:1: Failed parsing HTTP/2 "
     "(Expected SETTINGS frame as the first frame, got frame type 79)", False, "something else answers on that port"),
])
def test_grpc_reasons_become_sentences(address, details, tls, expected):
    """grpc's reasons as grpcio 1.85 words them (the DNS one as its c-ares resolver does); no connection is made."""
    sentence = connection_problem(address, details, "ca.pem" if tls else None, None)
    assert sentence and expected in sentence and sentence.startswith(f"cannot reach a dinofeat server at {address}")
