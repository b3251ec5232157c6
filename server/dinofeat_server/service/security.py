"""Who may talk to the server and who a request belongs to: bearer tokens (compared in constant time),
TLS credentials, and client identity.

Tokens come from a file, one per line, optionally after a name (dinofeat.contract.tokens); a request
must carry `authorization: Bearer <token>` metadata. A client is its token's name, or a keyed hash of
its token (a secret of this server process) when the line names none; without tokens, the peer's IP
address without its port. So identity comes only from authentication: a made-up header or a new
connection is not a new client. Tokens are never logged or echoed in errors.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from pathlib import Path

import grpc

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.tokens import read_credential, read_named_tokens

REFUSAL = "missing or wrong token; pass --token-file (or set DINOFEAT_TOKEN) with a token this server accepts."


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate and key; with a client CA, clients must present certificates it signed."""
    return grpc.ssl_server_credentials([(read_credential(key, "TLS key"), read_credential(cert, "TLS certificate"))],
                                       root_certificates=read_credential(client_ca, "client CA") if client_ca else None,
                                       require_client_auth=bool(client_ca))


def refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield  # pragma: no cover - abort raises

    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codecs)
    return grpc.unary_unary_rpc_method_handler(deny, **codecs)


class TokenAuthentication(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` for one of the accepted tokens, and
    names the client each token belongs to. `reload()` reads the token file again (SIGHUP)."""

    def __init__(self, token_file: str | Path):
        self.token_file = token_file
        self._secret = secrets.token_bytes(32)
        self._names: dict[bytes, str] = {}
        self.reload()

    def reload(self) -> None:
        """Accept the token file's tokens from now on. A file that cannot be read or parsed (deleted, emptied, a
        malformed line, a short token) refuses every token until it is fixed and reloaded, so that revoking a
        token never fails open; the DinofeatError says why."""
        try:
            named = read_named_tokens(self.token_file)
        except DinofeatError:
            self._names = {}
            raise
        self._names = {f"Bearer {token}".encode(): name or self.keyed_name(token) for token, name in named.items()}

    def keyed_name(self, token: str) -> str:
        """A name for an unnamed token: a hash keyed with this server's secret, useless for guessing the token."""
        return "token-" + hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()[:12]

    def client(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The name of the client whose token the call carries, or None for no or a wrong token."""
        presented = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(presented) != 1:
            return None
        given = presented[0].encode() if isinstance(presented[0], str) else presented[0]
        found = None
        for expected, name in self._names.items():  # no early exit: every comparison is made
            if hmac.compare_digest(given, expected):
                found = name
        return found

    def accepts(self, metadata) -> bool:
        return self.client(metadata) is not None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self.accepts(handler_call_details.invocation_metadata):
            return handler
        return refusing(handler)


def peer_address(peer: str) -> str:
    """The IP address of a gRPC peer string ("ipv4:10.0.0.5:51234", "ipv6:[::1]:51234"), without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return host or rest
    return peer  # unix sockets and others: the whole name


def client_identity(authentication: TokenAuthentication | None, metadata, peer: str) -> str:
    """Who a call belongs to: its token's name with tokens, else its IP address (users sharing a host share it)."""
    if authentication is not None:
        return authentication.client(metadata) or "unauthenticated"
    return peer_address(peer)


def check_certificate_pair(cert: str, key: str) -> None:
    """Refuse, in one sentence naming the problem, a TLS certificate and key that gRPC could not serve with:
    files swapped, not PEM, an encrypted key, or a key that belongs to another certificate. gRPC itself
    only fails to bind, which reads as a port in use; so the pair is tried here first with the standard library."""
    import re
    import ssl

    from dinofeat.contract.errors import DinofeatError

    certificate, private_key = read_credential(cert, "TLS certificate"), read_credential(key, "TLS key")
    holds_certificate = b"-----BEGIN CERTIFICATE-----" in certificate
    holds_key = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
    if not holds_certificate and holds_key.search(certificate) and b"-----BEGIN CERTIFICATE-----" in private_key:
        raise DinofeatError(f"the TLS certificate and key are swapped: {cert} holds a private key and {key} a certificate; "
                            "pass the certificate with --tls-cert and its key with --tls-key.")
    if not holds_certificate:
        raise DinofeatError(f"the TLS certificate {cert} is not a PEM certificate (no -----BEGIN CERTIFICATE----- line); "
                            "give the certificate in PEM form with --tls-cert (openssl x509 -inform der converts a DER one).")
    if not holds_key.search(private_key):
        raise DinofeatError(f"the TLS key {key} is not a PEM private key (no -----BEGIN ... PRIVATE KEY----- line); "
                            "give the certificate's private key in PEM form with --tls-key.")
    if b"ENCRYPTED" in private_key:
        raise DinofeatError(f"the TLS key {key} is encrypted with a passphrase, which the server cannot use; "
                            "give an unencrypted copy (openssl pkey -in KEY -out PLAIN_KEY) with --tls-key.")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise DinofeatError(f"the TLS certificate and key do not match: the key {key} does not belong to "
                                f"the certificate {cert}; give the key that was made with this certificate.") from None
        raise DinofeatError(f"the TLS certificate {cert} and key {key} cannot be used together ({error.reason or error}); "
                            "give a PEM certificate and its own unencrypted private key.") from None
    except OSError as error:
        raise DinofeatError(f"cannot read the TLS certificate {cert} or key {key} ({error.strerror}).") from None
