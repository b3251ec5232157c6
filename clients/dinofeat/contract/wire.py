"""The HDF5 wire format: dataset layout, chunk encoding as HDF5 stores it, and the attributes.

One definition serves both sides: the server encodes chunks with `encode_chunk`, the client writes
them unchanged with h5py's `write_direct_chunk` (see `dataset_file.py`). Chunks are stored exactly as
HDF5's own filter pipeline would store them (byte shuffle, then zlib deflate), so the file is a
standard HDF5 file that h5py, Fiji (JHDF5) and ilastik read without plug-ins.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np

if TYPE_CHECKING:
    from .computation import FeatureComputation

CHUNK_EDGE = 256
"""Chunks are (1, 256, 256) or (1, 1, 256, 256): one channel (and slice) by a 256 x 256 tile."""
COMPRESSIONS = ("gzip", "none")
DEFAULT_LEVEL = 1
MAX_MESSAGE_BYTES = 1 << 20
"""Upload pieces stay under 1 MiB, well below gRPC's 4 MiB default receive limit."""

AXIS_TYPE_FLAGS = {"c": 1, "z": 2, "y": 2, "x": 2, "t": 8}
"""vigra axistags type flags: Channels = 1, Space = 2, Time = 8."""


@dataclass(frozen=True)
class DatasetLayout:
    """Shape, chunking and filters of one streamed HDF5 dataset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    compression: str = "gzip"
    level: int = DEFAULT_LEVEL

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(math.ceil(n / c) for n, c in zip(self.shape, self.chunk_shape))

    @property
    def chunk_count(self) -> int:
        return math.prod(self.grid)

    def chunk_offset(self, index: int) -> tuple[int, ...]:
        """Offset (in samples) of chunk `index`, numbered row-major over the chunk grid."""
        position = np.unravel_index(index, self.grid)
        return tuple(int(p) * c for p, c in zip(position, self.chunk_shape))

    def chunk_index(self, offset: tuple[int, ...]) -> int:
        return int(np.ravel_multi_index(tuple(o // c for o, c in zip(offset, self.chunk_shape)), self.grid))

    def h5py_options(self) -> dict:
        """Keyword arguments for h5py's create_dataset that give this layout's filter pipeline."""
        options = {"shape": self.shape, "dtype": self.dtype, "chunks": self.chunk_shape}
        if self.compression == "gzip":
            options.update(compression="gzip", compression_opts=self.level, shuffle=True)
        return options


def feature_layout(name: str, shape: tuple[int, ...], compression: str = "gzip", level: int = DEFAULT_LEVEL,
                   dtype: str = "float32") -> DatasetLayout:
    """The layout for a (C, Y, X) or (C, Z, Y, X) stack: one channel (and slice) per 256 x 256 chunk."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if not 1 <= level <= 9:
        raise ValueError(f"the gzip level must be between 1 and 9, not {level}")
    chunk = (1,) * (len(shape) - 2) + (min(CHUNK_EDGE, shape[-2]), min(CHUNK_EDGE, shape[-1]))
    return DatasetLayout(name, dtype, tuple(int(n) for n in shape), chunk, compression, level)


def encode_chunk(block: np.ndarray, layout: DatasetLayout) -> bytes:
    """A chunk's samples as HDF5 stores them: zero-padded to the full chunk shape, shuffled, deflated.

    Each step reads its input where it lies (a view into the block) and writes its output once: raw
    chunks are one copy, shuffled ones one copy before deflate."""
    dtype = np.dtype(layout.dtype).newbyteorder("<")
    if block.shape != layout.chunk_shape:
        padded = np.zeros(layout.chunk_shape, dtype=dtype)
        padded[tuple(slice(0, n) for n in block.shape)] = block
        block = padded
    samples = np.asarray(block, dtype=dtype)
    if layout.compression == "none":
        return samples.tobytes()
    if samples.strides[-1] != dtype.itemsize:  # .view(uint8) needs contiguous rows
        samples = np.ascontiguousarray(samples)
    byte_planes = np.moveaxis(samples.view(np.uint8).reshape(*samples.shape, dtype.itemsize), -1, 0)
    return imagecodecs.deflate_encode(byte_planes.tobytes(), level=layout.level)  # libdeflate: a zlib stream, 2-3x faster than zlib


def iter_chunks(block: np.ndarray, origin: tuple[int, ...], layout: DatasetLayout) -> Iterator[tuple[int, tuple[int, ...], np.ndarray]]:
    """Split `block`, which starts at `origin` on chunk boundaries, into (index, offset, samples) chunks."""
    ranges = [range(0, n, c) for n, c in zip(block.shape, layout.chunk_shape)]
    for local in np.ndindex(*[len(r) for r in ranges]):
        start = tuple(r[i] for r, i in zip(ranges, local))
        piece = block[tuple(slice(s, s + c) for s, c in zip(start, layout.chunk_shape))]
        offset = tuple(o + s for o, s in zip(origin, start))
        yield layout.chunk_index(offset), offset, piece


def stream_checksum(chunk_digests: list[bytes]) -> str:
    """The trailer checksum: sha256 over every chunk's sha256 digest, in index order."""
    total = hashlib.sha256()
    for digest in chunk_digests:
        total.update(digest)
    return total.hexdigest()


def axistags(axes: str) -> str:
    """vigra axistags JSON for the on-disk axis order, e.g. "cyx" (ilastik reads the axes from it)."""
    return json.dumps({"axes": [
        {"key": key, "typeFlags": AXIS_TYPE_FLAGS[key], "resolution": 0, "description": ""} for key in axes
    ]})


def result_key(*parts: object) -> str:
    """A short identifier of one result (image checksum, feature set, encoding...), for resuming."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


CLASSIFIERS = ("extra_trees", "random_forest", "logistic", "gradient_boosting")
DEFAULT_CLASSIFIER = "extra_trees"
DEFAULT_TREES = 200
"""Trees of a forest when a request says 0 (or nothing)."""
DEFAULT_WINDOW = 4
"""Few-shot: the pooling window, in grid cells, when a request says 0."""
DEFAULT_GRID = 4
"""Few-shot: the grid cell, in pixels, when a request says 0."""
"""The classifier `segment` and `train` grow unless told otherwise (see server `segment/classifiers.py`)."""


def space_key(feature_space_json: str = "", fit_image_sha256: list[str] | tuple[str, ...] = ()) -> str:
    """How a feature request chose its space, as it enters the result key: "" for a space fitted on the
    image itself, else a digest of the given space (--like) or of the images it is fitted over."""
    if not feature_space_json and not fit_image_sha256:
        return ""
    return hashlib.sha256(json.dumps([feature_space_json, list(fit_image_sha256)]).encode()).hexdigest()[:16]


def features_result_key(image_sha: str, computation: FeatureComputation, compression: str, level: int, space: str = "") -> str:
    """Result key of a feature request: the server stamps it, the client matches partial files by it.

    `space` comes from `space_key`."""
    return result_key("features", image_sha, computation.key(), compression, level, *([space] if space else []))


def segment_result_key(image_sha: str, labels_sha: str, computation: FeatureComputation, classifier: str, trees: int,
                       seed: int) -> str:
    """Result key of a segmentation request."""
    return result_key("segment", image_sha, labels_sha, computation.key(), classifier or DEFAULT_CLASSIFIER, trees, seed)


def apply_result_key(model_sha: str, image_sha: str) -> str:
    """Result key of applying a model file to an image."""
    return result_key("apply", model_sha, image_sha)


def encoded_array(array: np.ndarray | None) -> dict | None:
    """An array as the feature-space JSON holds it: its shape and little-endian float32 samples in base64."""
    if array is None:
        return None
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def space_array(value: dict | None) -> np.ndarray | None:
    """A read-only float32 array of the feature-space JSON (`encoded_array`'s inverse)."""
    if value is None:
        return None
    return np.frombuffer(base64.b64decode(value["float32_base64"]), dtype="<f4").reshape(value["shape"])
