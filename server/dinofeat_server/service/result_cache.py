"""Recent feature results on disk, so a second request for the same features costs nothing.

An entry is the dataset stream itself (header, every chunk as stored, trailer), length-prefixed in
one file named by the request's key: image sha256, feature set and options, encoding and the weights'
checksum. Entries sit in a subfolder named for what every result depends on besides the request (the
dinofeat version and each feature set's definition, `results_namespace`), so that a server whose sets
changed (an upgrade) never streams what an earlier one computed; the folders of other versions can be
deleted at any time. Entries are written to a temporary name and renamed when complete; the least recently used
go first when the byte budget is exceeded; a result larger than the whole budget is not recorded at
all (it would only evict everything else). An entry is checked whole (complete messages, the trailer's
checksum over every chunk) before it is replayed; a damaged one is removed and computed again. Concurrent requests for one key compute it once: the
others wait for the first and then read the entry, and a waiter whose client gives up stops waiting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat import __version__
from dinofeat.contract.chunk_batches import chunks_of
from dinofeat.contract.wire import stream_checksum
from google.protobuf.message import DecodeError

from ..engine.stacks import FEATURE_SETS
from .streaming import Cancelled

LOG = logging.getLogger("dinofeat.server")
LENGTH = struct.Struct("<I")
LOCK_POLL_S = 0.2
"""How often a request waiting for another's result checks whether its own client has gone."""


def results_namespace() -> str:
    """The subfolder of this dinofeat's entries: its version and the definitions of its feature sets, hashed."""
    definitions = {name: fset.spec() for name, fset in FEATURE_SETS.items()}
    text = json.dumps({"dinofeat": __version__, "feature_sets": definitions}, sort_keys=True)
    return f"dinofeat-{__version__}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def entry_is_intact(f: BinaryIO) -> bool:
    """Whether an open entry is a whole stream: every length-prefixed message complete and parseable, a
    header first, a trailer last, and every chunk's bytes matching the trailer's checksum (so truncated,
    overwritten or flipped bytes are all caught before any message reaches a client)."""
    digests: dict[int, bytes] = {}
    messages: list[str] = []
    trailer = None
    try:
        while header := f.read(LENGTH.size):
            length = LENGTH.unpack(header)[0]
            data = f.read(length)
            if len(data) != length:
                return False
            message = pb.DatasetStream.FromString(data)
            kind = message.WhichOneof("message")
            messages.append(kind)
            for chunk in chunks_of(message):
                digests[chunk.index] = hashlib.sha256(chunk.data).digest()
            if kind == "trailer":
                trailer = message.trailer
    except (struct.error, DecodeError):
        return False
    if not messages or messages[0] != "header" or messages[-1] != "trailer" or len(digests) != trailer.chunk_count:
        return False
    if set(digests) != set(range(trailer.chunk_count)):
        return False
    return stream_checksum([digests[index] for index in range(trailer.chunk_count)]) == trailer.sha256


class ResultCache:
    """A directory of complete dataset streams within `budget_bytes`, in this dinofeat's subfolder of `folder`."""

    def __init__(self, folder: str | Path, budget_bytes: int):
        self.folder = Path(folder) / results_namespace()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.stream"

    def read(self, key: str) -> Iterator[pb.DatasetStream] | None:
        """The recorded messages of `key`, or None when there is no entry or it is damaged (then it is
        removed, to be computed and recorded again). The open file stays readable even when another
        request evicts the entry meanwhile."""
        try:
            f = open(self.path(key), "rb")
        except FileNotFoundError:
            return None
        if not entry_is_intact(f):
            f.close()
            LOG.warning("removed the damaged result cache entry %s; it is computed again", self.path(key).name)
            self.path(key).unlink(missing_ok=True)
            return None
        f.seek(0)
        os.utime(f.fileno())  # most recently used
        return self._messages(f)

    @staticmethod
    def _messages(f) -> Iterator[pb.DatasetStream]:
        with f:
            while header := f.read(LENGTH.size):
                yield pb.DatasetStream.FromString(f.read(LENGTH.unpack(header)[0]))

    def stream(self, key: str, compute: Callable[[], Iterator[pb.DatasetStream]],
               cancelled: threading.Event | None = None) -> Iterator[pb.DatasetStream]:
        """The entry for `key` if there is one (first message: progress "cached"), else compute() while
        recording it. Progress messages pass through but are not recorded. A result that outgrows the
        whole budget stops being recorded (its partial file goes) but still streams to the client.

        While another request computes the same key this one waits for it, until `cancelled` is set
        (its client went away): then it raises Cancelled instead of holding its worker."""
        lock = self._lock(key)
        while not lock.acquire(timeout=LOCK_POLL_S):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled()
        try:
            recorded = self.read(key)
            if recorded is not None:
                yield pb.DatasetStream(progress=pb.Progress(stage="cached", done=1, total=1))
                yield from recorded
                return
            last = yield from self._recorded(key, compute)
        finally:
            lock.release()
        if last is not None:  # held back so that a client which has the whole result sees a settled cache
            yield last

    def _recorded(self, key: str, compute: Callable[[], Iterator[pb.DatasetStream]]):
        """Relay compute()'s messages but the last (returned) while writing the entry of `key`, as long
        as it fits in the budget."""
        partial = self.path(key).with_suffix(f".{threading.get_ident()}.partial")
        last, size = None, 0
        f = open(partial, "wb")
        try:
            for message in compute():
                if not f.closed and message.WhichOneof("message") != "progress":
                    data = message.SerializeToString()
                    size += LENGTH.size + len(data)
                    if size > self.budget_bytes:  # larger than the whole cache: not worth keeping
                        f.close()
                        partial.unlink(missing_ok=True)
                    else:
                        f.write(LENGTH.pack(len(data)) + data)
                if last is not None:
                    yield last
                last = message
            if not f.closed:
                f.close()
                os.replace(partial, self.path(key))
                self.evict()
        finally:
            f.close()
            partial.unlink(missing_ok=True)
        return last

    def evict(self) -> None:
        """Remove least recently used entries beyond the byte budget."""
        entries = sorted(self._sizes(), key=lambda entry: entry[1].st_mtime)
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if total <= self.budget_bytes:
                break
            total -= stat.st_size
            path.unlink(missing_ok=True)

    def _sizes(self) -> list[tuple[Path, os.stat_result]]:
        """(path, stat) of every complete entry; entries another thread removes meanwhile are left out."""
        entries = []
        for path in self.folder.glob("*.stream"):
            try:
                entries.append((path, path.stat()))
            except FileNotFoundError:
                continue
        return entries

    def used_bytes(self) -> int:
        return sum(stat.st_size for _, stat in self._sizes())
