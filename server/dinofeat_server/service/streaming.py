"""Turn engine output into DatasetStream messages, and run that work off the event loop.

The engine yields blocks of rows; each block is cut into HDF5 chunks, encoded as HDF5 stores them
and sent as soon as it is ready, so no side holds the whole stack. Work runs in a worker thread and
hands messages to the event loop through a short queue: a slow client slows the work down instead of
piling chunks up in memory, and a client that goes away stops the work at the next block.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client.wire import (
    DatasetLayout,
    encode_chunk,
    iter_chunks,
    stream_checksum,
)

QUEUE_LENGTH = 8
"""Messages buffered between the worker thread and the network (backpressure beyond this)."""
CHUNK_ENCODERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="dinofeat-deflate")
"""zlib releases the GIL: the chunks of a block are deflated on all cores."""


class Cancelled(Exception):
    """The client went away or the server is stopping: abandon the work."""


def progress_message(stage: str, done: int, total: int) -> pb.DatasetStream:
    return pb.DatasetStream(progress=pb.Progress(stage=stage, done=done, total=total))


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
    """Header, every chunk of `blocks` ((origin, samples) on chunk boundaries), trailer; Progress items
    among the blocks (work done between chunks: tiles, strips) are passed on as they come."""
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
        encoded = CHUNK_ENCODERS.map(lambda chunk: encode_chunk(chunk[2], layout), chunks)
        for (index, offset, _), data in zip(chunks, encoded):
            digests[index] = hashlib.sha256(data).digest()
            yield pb.DatasetStream(chunk=pb.DatasetChunk(index=index, offset=offset, data=data))
        yield progress_message(stage, len(digests), layout.chunk_count)
    if len(digests) != layout.chunk_count:
        raise RuntimeError(f"the engine produced {len(digests)} of {layout.chunk_count} chunks")
    yield pb.DatasetStream(trailer=pb.DatasetTrailer(
        chunk_count=layout.chunk_count, sha256=stream_checksum([digests[i] for i in range(layout.chunk_count)])))


def only_chunks(messages: Iterable[pb.DatasetStream], wanted: set[int] | None) -> Iterator[pb.DatasetStream]:
    """Drop the chunks a resuming client already has (all chunks are still computed: the trailer's
    checksum covers them all)."""
    for message in messages:
        if wanted is None or message.WhichOneof("message") != "chunk" or message.chunk.index in wanted:
            yield message


async def messages_from_thread(
    work: Callable[[threading.Event], Iterator[pb.DatasetStream]],
    executor: Executor,
    seconds: float | None = None,
) -> AsyncIterator[pb.DatasetStream]:
    """Run the generator `work(cancelled)` in `executor`, yielding its messages on the event loop.

    Exceptions raised by the work are re-raised here; leaving the iteration early (the client
    cancelled or stalled, or `seconds` passed: TimeoutError) sets `cancelled`, and the worker stops at
    its next message. Closing the iteration waits for the worker thread to stop, so a worker counted
    free is free (close it with contextlib.aclosing, not by dropping it).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(QUEUE_LENGTH)
    cancelled = threading.Event()
    finished = object()

    def hand_over(item: object) -> None:
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                future.result(timeout=0.2)
                return
            except FutureTimeout:
                if cancelled.is_set():
                    future.cancel()
                    raise Cancelled() from None

    def run() -> None:
        messages = work(cancelled)
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
            messages.close()  # runs the work's own clean-up (partial cache entries, locks) at once

    worker = loop.run_in_executor(executor, run)
    deadline = None if seconds is None else loop.time() + seconds
    try:
        while True:
            item = await (queue.get() if deadline is None else asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0)))
            if item is finished:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        await asyncio.wait([worker])
