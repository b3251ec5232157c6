"""Write a streamed dataset into a standard HDF5 file, chunk by chunk, atomically and resumably.

The file grows under `NAME.partial` next to the final name; chunks go in with `write_direct_chunk`
as they arrive. Only when the trailer's count and checksum match what is on disk is the file renamed
to its final name, so a broken stream never leaves a half-written file there. A later request for the
same result (same result key) reopens the partial file and asks only for the chunks it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import DinofeatError
from .spaces import SPACE_GROUP, write_space
from .wire import DatasetLayout, stream_checksum

RESULT_KEY_ATTRIBUTE = "dinofeat_result_key"


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
    """An HDF5 file being filled from a dataset stream (`header`, chunks, then `finish`)."""

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key
        self.partial = partial_path(self.path)
        self.file: h5py.File | None = None
        self.dataset: h5py.Dataset | None = None
        self.digests: dict[tuple[int, ...], bytes] = {}  # of the chunks written in this session

    def resumable_indices(self) -> list[int] | None:
        """Chunk indices still missing from a matching partial file, or None to start afresh."""
        if not self.partial.exists():
            return None
        try:
            with h5py.File(self.partial, "r") as f:
                names = [name for name in f.keys() if name != SPACE_GROUP]
                if f.attrs.get(RESULT_KEY_ATTRIBUTE) != self.key or len(names) != 1:
                    return None
                dataset = f[names[0]]
                layout = stored_layout(dataset)
                present = {layout.chunk_index(dataset.id.get_chunk_info(i).chunk_offset) for i in range(dataset.id.get_num_chunks())}
                return sorted(set(range(layout.chunk_count)) - present)
        except (OSError, KeyError, ValueError):
            return None  # unreadable leftovers of a killed writer: start again

    def open(self, layout: DatasetLayout, attributes: dict, resume: bool) -> None:
        """Create the partial file for `layout`, or reopen it when resuming a matching one."""
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

    def write_chunk(self, offset: tuple[int, ...], data: bytes, filter_mask: int) -> None:
        self.dataset.id.write_direct_chunk(offset, data, filter_mask)
        self.digests[offset] = hashlib.sha256(data).digest()

    def flush(self) -> None:
        self.file.flush()

    def finish(self, chunk_count: int, checksum: str) -> Path:
        """Check every chunk against the trailer, close, and rename to the final name.

        Chunks written now are checked by the digests taken as they arrived; chunks from an earlier,
        interrupted session are read back from the file.
        """
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
            self.partial.unlink(missing_ok=True)
            raise DinofeatError("the received file does not match the server's checksum; run the command again.")
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
