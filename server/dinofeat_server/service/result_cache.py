"""Recent feature results on disk, so a second request for the same features costs nothing.

An entry is the dataset stream itself (header, every chunk as stored, trailer), length-prefixed in
one file named by the request's key: image sha256, feature set and options, encoding and the weights'
checksum. Entries sit in a subfolder named for what every result depends on besides the request (the
dinofeat version and each feature set's definition, `results_namespace`), so that a server whose sets
changed (an upgrade) never streams what an earlier one computed; the folders of other versions can be
deleted at any time. Entries are written to a temporary name and renamed when complete; the least recently used
go first when the byte budget is exceeded; a result larger than the whole budget is not recorded at
all (it would only evict everything else). Concurrent requests for one key compute it once: the
others wait for the first and then read the entry, and a waiter whose client gives up stops waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client import __version__

from ..engine.stacks import FEATURE_SETS
from .streaming import Cancelled

LENGTH = struct.Struct("<I")
LOCK_POLL_S = 0.2
"""How often a request waiting for another's result checks whether its own client has gone."""


def results_namespace() -> str:
    """The subfolder of this dinofeat's entries: its version and the definitions of its feature sets, hashed."""
    definitions = {name: fset.spec() for name, fset in FEATURE_SETS.items()}
    text = json.dumps({"dinofeat": __version__, "feature_sets": definitions}, sort_keys=True)
    return f"dinofeat-{__version__}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


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
        """The recorded messages of `key`, or None when there is no entry. The open file stays readable
        even when another request evicts the entry meanwhile."""
        try:
            f = open(self.path(key), "rb")
        except FileNotFoundError:
            return None
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
