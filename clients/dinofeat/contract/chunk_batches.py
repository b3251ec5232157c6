"""Several HDF5 chunks per DatasetStream message, for the clients that ask for them.

A chunk is 256 KiB of float32 at most; sent one per message, gRPC's cost per message (and the
hand-over between the server's threads) limits a stream to a fraction of what loopback carries. A
client that understands `DatasetStream.chunks` says so with the call metadata CHUNK_BATCHES (the
interceptor `AskForChunkBatches` adds it to every streaming call); the server then packs consecutive
chunks into messages of at most BATCH_BYTES (server streaming.py). Older clients never ask, so they
keep receiving one chunk per message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable

import grpc
from dinofeat.v1 import feature_service_pb2 as pb

CHUNK_BATCHES = ("dinofeat-chunk-batches", "1")
"""Call metadata of a client that reads `chunks` messages."""
BATCH_BYTES = 1 << 20
"""Stored chunk bytes per `chunks` message at most: with its framing, well under gRPC's 4 MiB default receive limit."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""mallopt's parameter numbers (glibc's malloc.h)."""
FREED_BYTES_KEPT = 32 << 20
"""glibc returns freed heap memory to the kernel only beyond this much (its default: 128 KiB)."""
HEAP_ALLOCATIONS_UP_TO = 4 << 20
"""glibc serves allocations up to this size from its heap (default: 128 KiB, raised as blocks are freed)."""


def keep_freed_memory() -> None:
    """Let glibc keep freed message buffers for the next ones (both sides call it before streaming): a stream
    allocates and frees 1 MiB messages and 256 KiB chunks hundreds of times a second, and faulting fresh
    pages in cost a fifth of the server's CPU time (25,000 faults per 243 MB streamed, a few hundred with
    this). Does nothing where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_TRIM_THRESHOLD, FREED_BYTES_KEPT)
    mallopt(M_MMAP_THRESHOLD, HEAP_ALLOCATIONS_UP_TO)


class AskForChunkBatches(grpc.UnaryStreamClientInterceptor):
    """Adds CHUNK_BATCHES to every call that streams its reply."""

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(details._replace(metadata=[*(details.metadata or []), CHUNK_BATCHES]), request)


def asks_for_batches(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Whether a call's metadata (server side: context.invocation_metadata()) carries CHUNK_BATCHES."""
    return any((key, value) == CHUNK_BATCHES for key, value in metadata)


def chunks_of(message: pb.DatasetStream) -> Iterable[pb.DatasetChunk]:
    """The chunks a `chunk` or `chunks` message carries (none for any other kind)."""
    kind = message.WhichOneof("message")
    if kind == "chunk":
        return (message.chunk,)
    return message.chunks.chunks if kind == "chunks" else ()
