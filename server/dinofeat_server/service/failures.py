"""How a call ends when it cannot finish: the failures the service raises, the gRPC status each ends its call
with and the outcome the request log names. The servicer maps them here, once (servicer.rpc); everything else a
call raises is a bug, which gRPC reports as UNKNOWN."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from dinofeat.contract.errors import DinofeatError


class Refused(Exception):
    """The request does not fit this server's limits now (a full queue, memory for uploads taken): try later."""


class Stalled(Exception):
    """The client read nothing, or sent nothing, for the server's stall_seconds."""


class OutOfTime(Exception):
    """The call ran past max_request_seconds or the client's own deadline."""


class ClientGone(Exception):
    """A message could not be written: the call ended on the client's side (cancelled, disconnected, killed)."""


@dataclass(frozen=True)
class Ending:
    """What a failure of `kind` does to its call: the status it ends with (None: the call is over already) and
    the outcome logged."""

    kind: type[BaseException]
    status: grpc.StatusCode | None
    outcome: str


ENDINGS = (
    Ending(DinofeatError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    Ending(Refused, grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
    Ending(Stalled, grpc.StatusCode.DEADLINE_EXCEEDED, "stalled"),
    Ending(OutOfTime, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"),
    Ending(ClientGone, None, "cancelled"),
    Ending(asyncio.CancelledError, None, "cancelled"),
)
ANSWERED = tuple(ending.kind for ending in ENDINGS if ending.status is not None)
"""The failures a client is told about, each with its status and sentence."""


def ending_of(error: BaseException) -> Ending | None:
    """The ending of a failure the service raises; None for anything else (a bug)."""
    return next((ending for ending in ENDINGS if isinstance(error, ending.kind)), None)
