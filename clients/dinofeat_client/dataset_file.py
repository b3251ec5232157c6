"""Write a streamed dataset into a standard HDF5 file, chunk by chunk, atomically and resumably.

The file grows under `NAME.partial` next to the final name; chunks go in with `write_direct_chunk`
as they arrive. Only when the trailer's count and checksum match what is on disk is the file renamed
to its final name, so a broken stream never leaves a half-written file there. A later request for the
same result (same result key) reopens the partial file and asks only for the chunks it lacks.

The partial file stays readable whatever stops the client, SIGKILL and a full disk included:
- HDF5 keeps the file's metadata (its chunk index, its end) in memory until a flush, and a file
  killed between flushes reads as it was at the last one: chunk data is written straight to new
  space at the end of the file, never over flushed metadata. So the file is flushed once created and
  then every FLUSH_EVERY_CHUNKS chunks or FLUSH_EVERY_S seconds; a resume re-requests at most the
  chunks of the last interval. (Tried with SIGKILL at random moments: every file opened, with every
  chunk it listed intact. HDF5's SWMR mode would also keep the file readable, but needs the newest
  file format, which older HDF5 readers such as Fiji's do not open, and leaves a killed file marked
  open for writing until `h5clear`; a journal of chunks beside the file would repeat what the flushed
  chunk index already records.)
- After a failed write (a full disk, a file too large) HDF5 still holds metadata it could not write;
  closing would write part of it (the superblock, with an end of file never reached), leaving the
  file unreadable. The file's descriptor is pointed at the null device first (`abandon`), so the
  partial stays as it was at its last flush, and a resume once there is space again starts from it.
- A partial file that cannot be read anyway is reported in one sentence and the transfer starts over.
Results that are not resumed (segmentations, analyses: `resumable=False`) leave no partial file after a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import imagecodecs
import numpy as np

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import remove_quietly, writing
from dinofeat.contract.wire import DatasetLayout, stream_checksum

from .spaces import SPACE_GROUP, write_space

RESULT_KEY_ATTRIBUTE = "dinofeat_result_key"
FLUSH_EVERY_CHUNKS = 16
FLUSH_EVERY_S = 1.0
"""The partial file's metadata is flushed after this many chunks or this many seconds, whichever comes first."""


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_attributes(target: h5py.AttributeManager, attributes: dict) -> None:
    """Store JSON-like attributes: lists of strings as HDF5 string arrays, dicts as JSON strings.

    A list of strings is also stored as one JSON string under KEY_json: Fiji's HDF5 library (JHDF5
    19.04) reads scalar strings but not variable-length string arrays."""
    for key, value in attributes.items():
        if isinstance(value, dict):
            target[key] = json.dumps(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            target.create(key, np.array(value, dtype=object), dtype=h5py.string_dtype())
            target[f"{key}_json"] = json.dumps(value)
        elif isinstance(value, list):
            target[key] = np.asarray(value)
        else:
            target[key] = value


def stored_layout(dataset: h5py.Dataset) -> DatasetLayout:
    """The chunk grid of a dataset on disk (filters do not matter for chunk numbering)."""
    return DatasetLayout(dataset.name, dataset.dtype.name, dataset.shape, dataset.chunks)


class DatasetFile:
    """An HDF5 file being filled from a dataset stream (`open`, chunks, then `finish`).

    With `resumable` (feature stacks) a failed or interrupted transfer keeps NAME.partial for a resume;
    without it the partial file is removed."""

    def __init__(self, path: Path, key: str, resumable: bool = True):
        self.path = Path(path)
        self.key = key
        self.resumable = resumable
        self.partial = partial_path(self.path)
        self.file: h5py.File | None = None
        self.dataset: h5py.Dataset | None = None
        self.digests: dict[tuple[int, ...], bytes] = {}  # of the chunks written in this session
        self._unflushed = 0
        self._flushed_at = 0.0

    def resumable_indices(self, notify: Callable[[str], None] = lambda message: None) -> list[int] | None:
        """Chunk indices still missing from a matching partial file, or None to start afresh (a partial
        file that cannot be read is reported to `notify` in one sentence)."""
        if not self.resumable or not self.partial.exists():
            return None
        try:
            with h5py.File(self.partial, "r") as f:
                names = [name for name in f.keys() if name != SPACE_GROUP]
                if f.attrs.get(RESULT_KEY_ATTRIBUTE) != self.key or len(names) != 1:
                    return None  # another request's leftovers: replaced
                dataset = f[names[0]]
                layout = stored_layout(dataset)
                present = {layout.chunk_index(dataset.id.get_chunk_info(i).chunk_offset) for i in range(dataset.id.get_num_chunks())}
                return sorted(set(range(layout.chunk_count)) - present)
        except (OSError, RuntimeError, KeyError, ValueError):
            notify(f"the partial file {self.partial} of an earlier run cannot be read (damaged), "
                   "so the transfer starts again from the beginning.")
            return None

    def open(self, layout: DatasetLayout, attributes: dict, resume: bool) -> None:
        """Create the partial file for `layout`, or reopen it when resuming a matching one."""
        with self.writing():
            if resume:
                self.file = h5py.File(self.partial, "r+")
                self.dataset = self.file[layout.name]
                if self.dataset.shape != layout.shape or self.dataset.chunks != layout.chunk_shape:
                    raise DinofeatError(f"the partial file {self.partial} does not match the server's result; delete it and retry.")
                return
            self.partial.unlink(missing_ok=True)
            self.file = h5py.File(self.partial, "w")
            self.file.attrs[RESULT_KEY_ATTRIBUTE] = self.key
            self.dataset = self.file.create_dataset(layout.name, **layout.h5py_options())
            attributes = dict(attributes)
            space = attributes.pop(SPACE_GROUP, None)
            write_attributes(self.dataset.attrs, attributes)
            if space:
                write_space(self.file, space)
            self.flush()  # from here on the partial file opens, whenever the client stops

    def write_chunk(self, offset: tuple[int, ...], data: bytes, filter_mask: int, sha256: bytes = b"", crc32: int = 0) -> None:
        """Write one chunk as stored. With the server's `sha256` and `crc32` of it, the bytes are checked by
        their CRC-32 (50 times faster than hashing them) and the server's digest goes into the trailer's
        check; otherwise they are hashed here."""
        if sha256:
            if imagecodecs.deflate_crc32(data) != crc32:
                raise DinofeatError("a chunk arrived damaged (its CRC-32 differs from the server's); run the same command again.")
            digest = sha256
        else:
            digest = hashlib.sha256(data).digest()
        with self.writing():
            self.dataset.id.write_direct_chunk(offset, data, filter_mask)
            self.digests[offset] = digest
            self._unflushed += 1
            if self._unflushed >= FLUSH_EVERY_CHUNKS or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
                self.flush()

    def flush(self) -> None:
        """Write HDF5's metadata (the chunk index): what is on disk now is what a resume finds."""
        self.file.flush()
        self._unflushed, self._flushed_at = 0, time.monotonic()

    def finish(self, chunk_count: int, checksum: str) -> Path:
        """Check every chunk against the trailer, close, and rename to the final name.

        Chunks written now are checked by the digests taken as they arrived; chunks from an earlier,
        interrupted session are read back from the file.
        """
        with self.writing():
            dataset = self.dataset
            stored = dataset.id.get_num_chunks()
            if stored != chunk_count:
                self.close()
                raise DinofeatError(f"the stream ended with {stored} of {chunk_count} chunks; run the same command again to resume.")
            layout = stored_layout(dataset)
            digests = []
            for index in range(chunk_count):
                offset = layout.chunk_offset(index)
                digest = self.digests.get(offset)
                if digest is None:
                    digest = hashlib.sha256(dataset.id.read_direct_chunk(offset)[1]).digest()
                digests.append(digest)
            self.close()
            if stream_checksum(digests) != checksum:
                remove_quietly(self.partial)
                raise DinofeatError("the received file does not match the server's checksum; run the command again.")
            os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the file (flushing it); after a failure, keep the partial file only when it is resumable."""
        if self.file is not None:
            with self.writing():
                self.file.close()
            self.file = self.dataset = None

    def discard(self) -> None:
        """After a failed or interrupted transfer: close, and remove the partial file unless it is resumable."""
        try:
            self.close()
        finally:
            if not self.resumable:
                remove_quietly(self.partial)

    @contextlib.contextmanager
    def writing(self):
        """A failed write in the block: abandon the file (kept as of its last flush) and say so in one sentence."""
        then = f"run the same command again: it resumes from the chunks kept in {self.partial.name}" if self.resumable \
            else "run the command again"
        try:
            with writing(self.partial, then):
                yield
        except DinofeatError:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Give up the open file without letting HDF5 write anything more to it (see the module's docstring)."""
        if self.file is None:
            return
        with contextlib.suppress(Exception):
            handle = self.file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(null, handle)  # HDF5's later writes fail on a read-only descriptor; the partial file stays as flushed
            finally:
                os.close(null)
        with contextlib.suppress(Exception):
            self.file.close()  # fails (nothing can be written), but an h5py file dropped unclosed crashes the interpreter at exit
        self.file = self.dataset = None
        if not self.resumable:
            remove_quietly(self.partial)
