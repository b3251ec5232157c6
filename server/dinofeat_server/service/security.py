"""Who may talk to the server: bearer tokens (compared in constant time) and TLS credentials.

Tokens come from a file, one per line (blank lines and # comments ignored); a request must carry
`authorization: Bearer <token>` metadata. Tokens are never logged or echoed in errors.
"""

from __future__ import annotations

import hmac

import grpc

from dinofeat_client.tokens import read_credential

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
    """Lets a call through only with `authorization: Bearer <token>` for one of the accepted tokens."""

    def __init__(self, tokens: list[str]):
        self._expected = [f"Bearer {t}".encode() for t in tokens]

    def accepts(self, metadata) -> bool:
        presented = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(presented) != 1:
            return False
        given = presented[0].encode() if isinstance(presented[0], str) else presented[0]
        return any([hmac.compare_digest(given, expected) for expected in self._expected])  # no early exit

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self.accepts(handler_call_details.invocation_metadata):
            return handler
        return refusing(handler)
