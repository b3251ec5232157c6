"""Turn engine output into DatasetStream messages, and run that work off the event loop.

The engine yields blocks of rows; each block is cut into HDF5 chunks, encoded as HDF5 stores them
(and hashed) on the encoder threads, and sent as soon as it is ready, several chunks to a message
(at most BATCH_BYTES), so no side holds the whole stack. Work runs in a worker thread of its own and
hands messages to the event loop through a short queue, without waiting for the loop in between: a
slow client slows the work down instead of piling chunks up in memory, and a client that goes away
stops the work at the next block.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import imagecodecs
import numpy as np
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.contract.chunk_batches import BATCH_BYTES, chunks_of
from dinofeat.contract.wire import DatasetLayout, encode_chunk, iter_chunks, stream_checksum

from ..engine.progress import Advance, relayed

Result = TypeVar("Result")
QUEUE_LENGTH = 4
"""Messages buffered between the worker thread and the network (backpressure beyond this)."""
CHUNK_ENCODERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="dinofeat-deflate")
"""Deflate and sha256 release the GIL: the chunks of a block are encoded and hashed on all cores, in tasks of
CHUNKS_PER_TASK chunks (one task per chunk costs as much in hand-overs as hashing a raw chunk)."""
CHUNKS_PER_TASK = 8


class Cancelled(Exception):
    """The client went away or the server is stopping: abandon the work."""


def progress_message(stage: str, done: int, total: int) -> pb.DatasetStream:
    return pb.DatasetStream(progress=pb.Progress(stage=stage, done=done, total=total))


def progress_of(advance: Advance, prefix: str = "") -> pb.Progress:
    """The engine's progress as a wire message, its stage after `prefix` ("slice 2/5: ")."""
    return pb.Progress(stage=f"{prefix}{advance.stage}", done=advance.done, total=advance.total, notice=advance.notice)


def as_stream(progress: Generator[pb.Progress, None, Result]) -> Generator[pb.DatasetStream, None, Result]:
    """Progress as DatasetStream messages; returns what the wrapped generator returns."""
    return (yield from relayed(progress, lambda message: pb.DatasetStream(progress=message)))


def header_message(layout: DatasetLayout, attributes: dict, key: str) -> pb.DatasetStream:
    return pb.DatasetStream(header=pb.DatasetHeader(
        name=layout.name, dtype=layout.dtype, shape=layout.shape, chunk_shape=layout.chunk_shape,
        encoding=pb.Encoding(compression=layout.compression, level=layout.level),
        attributes_json=json.dumps(attributes), chunk_count=layout.chunk_count, result_key=key,
    ))


def dataset_messages(
    layout: DatasetLayout,
    attributes: dict,
    key: str,
    blocks: Iterable[tuple[tuple[int, ...], np.ndarray] | pb.Progress],
    cancelled: threading.Event,
    stage: str,
) -> Iterator[pb.DatasetStream]:
    """Header, every chunk of `blocks` ((origin, samples) on chunk boundaries) in `chunks` messages of at
    most BATCH_BYTES, trailer; Progress items among the blocks (work done between chunks: tiles, strips)
    are passed on as they come. Chunks are encoded and hashed by CHUNK_ENCODERS, so this thread only
    gathers them, and a block's last batch goes out with it."""
    yield header_message(layout, attributes, key)
    digests: dict[int, bytes] = {}
    for item in blocks:
        if cancelled.is_set():
            raise Cancelled()
        if isinstance(item, pb.Progress):
            yield pb.DatasetStream(progress=item)
            continue
        origin, block = item
        chunks = list(iter_chunks(block, origin, layout))
        groups = [chunks[start : start + CHUNKS_PER_TASK] for start in range(0, len(chunks), CHUNKS_PER_TASK)]
        batch, size = pb.DatasetStream(chunks=pb.DatasetChunks()), 0
        for group, encoded in zip(groups, CHUNK_ENCODERS.map(partial(hashed_chunks, layout=layout), groups)):
            for (index, offset, _), (data, digest, crc) in zip(group, encoded):
                digests[index] = digest
                if size and size + len(data) > BATCH_BYTES:
                    batch.chunks.data_bytes = size
                    yield batch
                    batch, size = pb.DatasetStream(chunks=pb.DatasetChunks()), 0
                batch.chunks.chunks.add(index=index, offset=offset, data=data, sha256=digest, crc32=crc)  # set in place: one copy
                size += len(data)
        if size:
            batch.chunks.data_bytes = size
            yield batch
        yield progress_message(stage, len(digests), layout.chunk_count)
    if len(digests) != layout.chunk_count:
        raise RuntimeError(f"the engine produced {len(digests)} of {layout.chunk_count} chunks")
    yield pb.DatasetStream(trailer=pb.DatasetTrailer(
        chunk_count=layout.chunk_count, sha256=stream_checksum([digests[i] for i in range(layout.chunk_count)])))


def hashed_chunks(chunks: list[tuple[int, tuple[int, ...], np.ndarray]], layout: DatasetLayout) -> list[tuple[bytes, bytes, int]]:
    """(stored bytes, their sha256, their CRC-32) of each (index, offset, samples) chunk: all release the GIL."""
    encoded = [encode_chunk(samples, layout) for _, _, samples in chunks]
    return [(data, hashlib.sha256(data).digest(), imagecodecs.deflate_crc32(data)) for data in encoded]


def only_chunks(messages: Iterable[pb.DatasetStream], wanted: set[int] | None) -> Iterator[pb.DatasetStream]:
    """Drop the chunks a resuming client already has (all chunks are still computed: the trailer's
    checksum covers them all)."""
    for message in messages:
        if wanted is None or message.WhichOneof("message") not in ("chunk", "chunks"):
            yield message
            continue
        kept = [chunk for chunk in chunks_of(message) if chunk.index in wanted]
        if len(kept) == len(chunks_of(message)):
            yield message
        elif kept:
            yield pb.DatasetStream(chunks=pb.DatasetChunks(chunks=kept, data_bytes=sum(len(chunk.data) for chunk in kept)))


Sized = tuple[pb.DatasetStream, int]
"""A message to send and the bytes of data it carries (stored chunk bytes, a model file's piece)."""


def sized(messages: Iterable[pb.DatasetStream], batches: bool) -> Iterator[Sized]:
    """`messages` each with its bytes of data; for a client that does not ask for batches (`batches`
    False: older clients), every `chunks` message is sent as single `chunk` messages."""
    for message in messages:
        kind = message.WhichOneof("message")
        if kind == "chunks" and not batches:
            for chunk in message.chunks.chunks:
                yield pb.DatasetStream(chunk=chunk), len(chunk.data)
        elif kind == "chunk":
            yield message, len(message.chunk.data)
        elif kind == "chunks":
            yield message, message.chunks.data_bytes
        else:
            yield message, len(message.model_piece) if kind == "model_piece" else 0


async def messages_from_thread(
    work: Callable[[threading.Event], Iterator[pb.DatasetStream]],
    executor: Executor,
    seconds: float | None = None,
    batches: bool = False,
) -> AsyncIterator[Sized]:
    """Run the generator `work(cancelled)` in `executor`, yielding its messages on the event loop, each
    with its bytes of data; chunks go in `chunks` messages to a client that asks for `batches`, else one
    by one (see `sized`).

    The worker hands messages over without waiting for the loop, up to QUEUE_LENGTH not yet sent: a
    message makes room for the next one only once the caller asks for the one after it (has sent it).
    Exceptions raised by the work are re-raised here; leaving the iteration early (the client cancelled
    or stalled, or `seconds` passed: TimeoutError) sets `cancelled`, and the worker stops at its next
    message. Closing the iteration waits for the worker thread to stop, so a worker counted free is
    free (close it with contextlib.aclosing, not by dropping it).
    """
    loop = asyncio.get_running_loop()
    handed: deque = deque()
    room = threading.Semaphore(QUEUE_LENGTH)
    arrived = asyncio.Event()
    cancelled = threading.Event()
    finished = object()

    def hand_over(item: object) -> None:
        while not room.acquire(timeout=0.2):
            if cancelled.is_set():
                raise Cancelled()
        if cancelled.is_set():
            raise Cancelled()
        handed.append(item)
        wake_loop(loop, arrived.set)

    def run() -> None:
        produced = work(cancelled)
        messages = sized(produced, batches)
        try:
            for message in messages:
                hand_over(message)
            hand_over(finished)
        except Cancelled:
            pass
        except BaseException as error:  # handed to the event loop, which reports it to the client
            try:
                hand_over(error)
            except Cancelled:
                pass
        finally:
            messages.close()
            produced.close()  # runs the work's own clean-up (partial cache entries, locks) at once

    worker = loop.run_in_executor(executor, run)
    deadline = None if seconds is None else loop.time() + seconds
    try:
        while True:
            while not handed:
                arrived.clear()
                if not handed:
                    await asyncio.wait_for(arrived.wait(), None if deadline is None else max(deadline - loop.time(), 0))
            item = handed.popleft()
            if item is finished:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            room.release()
    finally:
        cancelled.set()
        room.release()  # a worker waiting for room sees `cancelled` at once
        await asyncio.wait([worker])


class ThreadPerCall(Executor):
    """Runs each call in a thread of its own, started with `initializer(*initargs)`: a stream set aside while
    its client reads nothing keeps its (parked) thread, so a pool with a thread per slot could run out
    while slots are free."""

    def __init__(self, name: str, initializer: Callable[..., object], *initargs: object):
        self.name, self.initializer, self.initargs = name, initializer, initargs
        self._count = itertools.count()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                self.initializer(*self.initargs)
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)

        threading.Thread(target=run, name=f"{self.name}_{next(self._count)}", daemon=True).start()
        return future


def wake_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run `callback` on `loop` soon, from any thread; nothing once the loop has closed (the server stopped)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass
