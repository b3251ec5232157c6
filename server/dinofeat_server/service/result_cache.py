"""Recent feature results on disk, so a second request for the same features costs nothing.

An entry is the dataset stream itself (header, every chunk as stored, trailer), length-prefixed in
one file named by the request's key: image sha256, feature set and options, encoding and the weights'
checksum. Entries are written to a temporary name and renamed when complete; the least recently used
go first when the byte budget is exceeded. Concurrent requests for one key compute it once: the
others wait for the first and then read the entry.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dinofeat.v1 import feature_service_pb2 as pb

LENGTH = struct.Struct("<I")


class ResultCache:
    """A directory of complete dataset streams within `budget_bytes`."""

    def __init__(self, folder: str | Path, budget_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.stream"

    def read(self, key: str) -> Iterator[pb.DatasetStream]:
        path = self.path(key)
        os.utime(path)  # most recently used
        with open(path, "rb") as f:
            while header := f.read(LENGTH.size):
                yield pb.DatasetStream.FromString(f.read(LENGTH.unpack(header)[0]))

    def stream(self, key: str, compute: Callable[[], Iterator[pb.DatasetStream]]) -> Iterator[pb.DatasetStream]:
        """The entry for `key` if there is one (first message: progress "cached"), else compute() while
        recording it. Progress messages pass through but are not recorded."""
        with self._lock(key):
            if self.path(key).exists():
                yield pb.DatasetStream(progress=pb.Progress(stage="cached", done=1, total=1))
                yield from self.read(key)
                return
            partial = self.path(key).with_suffix(f".{threading.get_ident()}.partial")
            try:
                with open(partial, "wb") as f:
                    for message in compute():
                        if message.WhichOneof("message") != "progress":
                            data = message.SerializeToString()
                            f.write(LENGTH.pack(len(data)) + data)
                        yield message
                os.replace(partial, self.path(key))
            finally:
                partial.unlink(missing_ok=True)
        self.evict()

    def evict(self) -> None:
        """Remove least recently used entries beyond the byte budget."""
        entries = sorted(self.folder.glob("*.stream"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for path in entries:
            if total <= self.budget_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.stream"))
