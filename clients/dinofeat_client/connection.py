"""The first connection to a server: wait for it, and when it cannot work say why in one sentence
(nothing listening, a host name that does not resolve, which side of TLS is missing) instead of
retrying in silence. grpc reports most causes in its own words; a plaintext client facing a TLS
server hears only "Socket closed", so a TLS handshake of our own asks what the server speaks."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Callable

import grpc

from dinofeat.contract.errors import DinofeatError

FIRST_BACKOFF_S = 0.5
LONGEST_BACKOFF_S = 8.0
"""Pauses between attempts double from the first to the longest."""
NO_ANSWER_NOTICE_S = 2.0
"""A first connection still without any answer after this long is announced (notify) while it goes on waiting."""
PROBE_S = 1.0
PROBE_METHOD = "/grpc.health.v1.Health/Check"
"""Asked, without waiting for a connection, only after one failed: its error says why (grpc's own words)."""


def wait_until_connected(channel: grpc.Channel, address: str, timeout_s: float, tls_ca: str | None, tls_cert: str | None,
                     notify: Callable[[str], None]) -> None:
    """Wait for the first connection to the server, failing fast with one sentence when it cannot work.

    Nothing listening, a host name that does not resolve and a TLS mismatch (a plaintext client and a
    TLS server, or the converse, a certificate not signed by --tls-ca, a missing client certificate)
    end the wait at once. Other failures are tried again, one `notify` line each, until `timeout_s`."""
    state = Connectivity()
    channel.subscribe(state.update, try_to_connect=True)
    deadline, announced = time.monotonic() + timeout_s, False
    try:
        while not state.wait_for_change(min(deadline - time.monotonic(), NO_ANSWER_NOTICE_S)):
            if time.monotonic() >= deadline:
                raise DinofeatError(f"cannot reach a dinofeat server at {address}: no answer within {timeout_s:.0f} s; "
                                    "check the host:port (and any firewall on the way), start one with `dinofeat serve`, "
                                    "or leave out --server to use an embedded one.")
            if not announced:
                announced = True
                notify(f"no answer yet from the server at {address}; waiting up to {timeout_s:.0f} s.")
        pause = FIRST_BACKOFF_S
        while state.state != grpc.ChannelConnectivity.READY:
            details = failure_details(channel, min(deadline - time.monotonic(), PROBE_S))
            if details is None:
                return  # connected meanwhile: the server answered the probe
            sentence = connection_problem(address, details, tls_ca, tls_cert)
            if sentence:
                raise DinofeatError(sentence)
            reason, left = last_error(details) or "no answer", deadline - time.monotonic()
            if left <= pause:
                raise DinofeatError(f"cannot reach a dinofeat server at {address} ({reason}); check the host:port, "
                                    "start one with `dinofeat serve`, or leave out --server to use an embedded one.")
            notify(f"cannot reach the server at {address} yet ({reason}); trying again in {pause:.1f} s "
                        f"(giving up {left:.0f} s from now).")
            state.wait_for((grpc.ChannelConnectivity.READY,), pause)
            pause = min(pause * 2, LONGEST_BACKOFF_S)
    finally:
        channel.unsubscribe(state.update)


def failure_details(channel: grpc.Channel, timeout_s: float) -> str | None:
    """Why the channel failed to connect, in grpc's words ("" when unsaid), or None when it connected after all."""
    probe = channel.unary_unary(PROBE_METHOD)
    try:
        probe(b"", timeout=max(timeout_s, 0.05))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return error.details() or ""
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ""
    return None  # any answer (even UNIMPLEMENTED or UNAUTHENTICATED) comes from a connected server


class Connectivity:
    """A channel's connectivity as grpc reports it (`update` is its subscriber), with waits for a change."""

    def __init__(self):
        self.state: grpc.ChannelConnectivity | None = None
        self._changed = threading.Condition()

    def update(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self.state = state
            self._changed.notify_all()

    def wait_for_change(self, timeout_s: float) -> bool:
        """Whether the first connection attempt ended (READY or TRANSIENT_FAILURE) within `timeout_s`."""
        return self.wait_for((grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE), timeout_s)

    def wait_for(self, states: tuple[grpc.ChannelConnectivity, ...], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.state in states, timeout=max(timeout_s, 0))


def last_error(details: str) -> str:
    """grpc's reason for a failed connection without its status code and peer prefixes."""
    match = re.search(r"last error: (?:[A-Z_]+: )?(?:(?:ipv4|ipv6|unix|unix-abstract|vsock):\S*?: )?(.*)", details)
    return (match.group(1) if match else details).strip().rstrip(".")


def host_and_port(address: str) -> tuple[str, int] | None:
    """The host and TCP port of a "host:port", "[v6]:port" or "dns:///host:port" address; None for others."""
    target = re.sub(r"^dns:(//[^/]*/)?", "", address)
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:/\[\]]+)(?::(\d+))?", target)
    if not match:
        return None
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return (host, int(port or 443)) if int(port or 443) < 65536 else None


def speaks_tls(address: str, timeout_s: float = PROBE_S) -> bool:
    """Whether the server at `address` completes a TLS handshake (certificate unchecked: only its language is asked)."""
    where = host_and_port(address)
    if where is None:
        return False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(where, timeout=timeout_s) as raw, context.wrap_socket(raw, server_hostname=where[0]):
            return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError: a plaintext server answers the hello with HTTP/2 bytes
        return False


def something_listens(address: str, timeout_s: float = PROBE_S / 2) -> bool:
    """Whether any of the addresses `address` resolves to accepts a TCP connection."""
    where = host_and_port(address)
    try:
        found = socket.getaddrinfo(*where, type=socket.SOCK_STREAM) if where else []
    except OSError:
        return False
    for family, kind, protocol, _, sockaddr in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.settimeout(timeout_s)
            if probe.connect_ex(sockaddr) == 0:
                return True
    return False


def connection_problem(address: str, details: str, tls_ca: str | None, tls_cert: str | None) -> str | None:
    """One sentence for a first connection that cannot work as configured, or None for a failure that may pass.

    grpc's reason (`details`) names most cases; a plaintext client talking to a TLS server hears only
    "Socket closed", so a TLS handshake of its own (certificate unchecked) asks what the server speaks."""
    text = details.lower()
    where = f"cannot reach a dinofeat server at {address}"
    elsewhere = ", or leave out --server to use an embedded one."
    host = (host_and_port(address) or (address, 0))[0]
    refused = "connection refused" in text or ("unix:" in text and "no such file" in text)
    if refused and not something_listens(address):  # grpc names only its last address's failure
        return f"{where}: nothing listens there (connection refused); start one with `dinofeat serve`, check the host:port{elsewhere}"
    if "resolving" in text or "dns resolution" in text or "domain name not found" in text or "name or service not known" in text:
        return f"{where}: the host name {host} does not resolve; check the host:port{elsewhere}"
    if "network is unreachable" in text or "no route to host" in text or "host is unreachable" in text:
        why = last_error(details).rsplit(": ", 1)[-1].lower()
        return f"{where}: this machine has no route to {host} ({why}); check the host:port and the network{elsewhere}"
    if "failed parsing http/2" in text or "missing selected alpn" in text:
        return f"{where}: something else answers on that port (not a gRPC server); check the host:port{elsewhere}"
    if tls_ca or tls_cert:
        if "wrong_version_number" in text or "http_request" in text or "packet_length_too_long" in text:
            return (f"{where} over TLS: the server there does not speak TLS; drop --tls-ca, "
                    "or start the server with --tls-cert and --tls-key.")
        if "certificate_verify_failed" in text:
            if "expired" in text:
                return f"{where} over TLS: the server's certificate has expired; give the server a new one."
            signer = f"--tls-ca {tls_ca}" if tls_ca else "a CA this machine trusts"
            return (f"{where} over TLS: its certificate is not signed by {signer}; "
                    "pass --tls-ca with the CA that signed the server's certificate.")
        if "hostname verification" in text:
            return (f"{where} over TLS: its certificate is not made out to {host}; connect by a name or address "
                    "the certificate lists, or give the server a certificate for this one.")
        if ("socket closed" in text or "connection reset" in text or "certificate_required" in text
                or "peer_did_not_return_a_certificate" in text):  # the server asks for a client certificate
            if not tls_cert:
                return (f"{where} without a client certificate: the server asks for one; "
                        "pass --tls-cert and --tls-key (signed by the CA the server trusts).")
            return (f"{where} with the client certificate {tls_cert}: the server does not accept it; pass one signed "
                    "by the CA the server trusts (its --tls-client-ca).")
        return None
    if speaks_tls(address):
        return f"{where} without TLS: the server there speaks TLS; pass --tls-ca CA.pem (the CA that signed its certificate)."
    return None
