"""Uploaded images, held in memory by content address (sha256) within a byte budget (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from dinofeat_client.errors import DinofeatError
from dinofeat_client.images import (
    SUPPORTED_DTYPES,
    check_image,
    image_axes,
    image_sha256,
)

DEFAULT_BUDGET_BYTES = 4 << 30
DEFAULT_MAX_PIXELS = 1 << 30


def check_layout(dtype: str, shape: tuple[int, ...], axes: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Validate an upload's declared layout before any bytes are accepted; return its byte size."""
    if dtype not in SUPPORTED_DTYPES:
        raise DinofeatError(f"images of type {dtype!r} are not supported; send 8- or 16-bit integers or floats.")
    if axes not in ("yx", "yxc", "zyx", "zyxc") or len(shape) != len(axes) or any(n <= 0 for n in shape):
        raise DinofeatError(f"the image layout {axes!r} with shape {list(shape)} is not a 2-D image, RGB image or stack.")
    pixels = int(np.prod(shape, dtype=np.int64))
    if pixels > max_pixels:
        raise DinofeatError(f"the image has {pixels} samples, more than this server's limit of {max_pixels}; send a smaller image or tile it.")
    return pixels * np.dtype(dtype).itemsize


def image_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...], axes: str, sha256: str) -> np.ndarray:
    """Rebuild and check an uploaded image; its content must hash to the announced sha256."""
    image = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    if image_sha256(image) != sha256:
        raise DinofeatError("the uploaded image does not match its sha256; the upload was corrupted, send it again.")
    if image_axes(image) != axes:
        raise DinofeatError(f"the image shape {list(shape)} does not fit the axes {axes!r}.")
    return check_image(image)


class ImageStore:
    """Thread-safe LRU map sha256 -> image array, evicting the least recently used beyond the budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, sha256: str, image: np.ndarray) -> None:
        with self._lock:
            self._images[sha256] = image
            self._images.move_to_end(sha256)
            while sum(a.nbytes for a in self._images.values()) > self.budget_bytes and len(self._images) > 1:
                self._images.popitem(last=False)

    def get(self, sha256: str) -> np.ndarray | None:
        with self._lock:
            image = self._images.get(sha256)
            if image is not None:
                self._images.move_to_end(sha256)
            return image

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._images.values())

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._images
