"""Uploaded images (and model files), held in memory by content address (sha256) within a byte budget
(least recently used go first), with room reserved for uploads in flight."""

from __future__ import annotations

import math
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from operator import attrgetter

import numpy as np
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import SUPPORTED_DTYPES, check_image, image_axes, image_sha256

from .failures import Refused

DEFAULT_BUDGET_BYTES = 4 << 30
DEFAULT_MAX_PIXELS = 1 << 30


def check_layout(dtype: str, shape: tuple[int, ...], axes: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Validate an upload's declared layout before any bytes are accepted; return its byte size."""
    if dtype not in SUPPORTED_DTYPES:
        raise DinofeatError(f"images of type {dtype!r} are not supported; send 8- or 16-bit integers or floats.")
    if axes not in ("yx", "yxc", "zyx", "zyxc") or len(shape) != len(axes) or any(n <= 0 for n in shape):
        raise DinofeatError(f"the image layout {axes!r} with shape {list(shape)} is not a 2-D image, RGB image or stack.")
    pixels = math.prod(int(n) for n in shape)  # exact: an int64 product of huge sides wraps round to a small number
    if pixels > max_pixels:
        raise DinofeatError(f"the image has {pixels} samples, more than this server's limit of {max_pixels}; send a smaller image or tile it.")
    return pixels * np.dtype(dtype).itemsize


def image_from_bytes(data: bytes | bytearray, dtype: str, shape: tuple[int, ...], axes: str, sha256: str) -> np.ndarray:
    """Rebuild and check an uploaded image; its content must hash to the announced sha256."""
    image = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if image_sha256(image) != sha256:
        raise DinofeatError("the uploaded image does not match its sha256; the upload was corrupted, send it again.")
    if image_axes(image) != axes:
        raise DinofeatError(f"the image shape {list(shape)} does not fit the axes {axes!r}.")
    return check_image(image)


class OverBudget(Refused):
    """An upload does not fit: the memory for uploads is taken, or the client's share of it (RESOURCE_EXHAUSTED)."""


class ContentStore:
    """Thread-safe map sha256 -> object, holding at most `budget_bytes` (`size_of` each object); the
    least recently used go first, but the newest always stays."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, size_of: Callable[[object], int] = attrgetter("nbytes")):
        self.budget_bytes = budget_bytes
        self._size_of = size_of
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, sha256: str, item: object) -> None:
        with self._lock:
            self._items[sha256] = item
            self._items.move_to_end(sha256)
            self._evict()

    def _evict(self, room: int = 0) -> None:
        """Drop the least recently used until the items and `room` fit the budget (the lock is held)."""
        while self._used() + room > self.budget_bytes and len(self._items) > 1:
            self._items.popitem(last=False)

    def _used(self) -> int:
        return sum(self._size_of(item) for item in self._items.values())

    def get(self, sha256: str):
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
            return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._items


class ImageStore(ContentStore):
    """Uploaded images, and the room that uploads in flight reserve: all of it within the budget (held
    images are evicted to make room), each client's uploads in flight within `client_bytes`."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, client_bytes: int | None = None):
        super().__init__(budget_bytes)
        self.client_bytes = budget_bytes if client_bytes is None else client_bytes
        self._reserved: dict[str, int] = {}

    def _evict(self, room: int = 0) -> None:
        super()._evict(room + sum(self._reserved.values()))

    @contextlib.contextmanager
    def reservation(self, client: str) -> Iterator[Callable[[int], None]]:
        """While the body runs, `grow(n)` reserves n more bytes for an upload of `client` (OverBudget when
        they do not fit); all of it is given back at the end."""
        held = 0

        def grow(nbytes: int) -> None:
            nonlocal held
            with self._lock:
                mine, everyone = self._reserved.get(client, 0), sum(self._reserved.values())
                if mine + nbytes > self.client_bytes:
                    raise OverBudget(f"this upload would take this client's uploads in flight past {self.client_bytes / 1e9:.2g} GB, "
                                     "the server's limit per client (client_upload_gb); wait for the others to finish or send less.")
                if everyone + nbytes > self.budget_bytes:
                    raise OverBudget(f"the server's memory for uploads ({self.budget_bytes / 1e9:.2g} GB, image_store_gb) is taken "
                                     "by uploads in flight; try again in a moment.")
                self._reserved[client] = mine + nbytes
                held += nbytes
                self._evict()

        try:
            yield grow
        finally:
            with self._lock:
                left = self._reserved.pop(client, 0) - held
                if left:
                    self._reserved[client] = left

    def in_flight(self) -> dict[str, int]:
        """Client -> bytes its uploads in flight have reserved."""
        with self._lock:
            return dict(self._reserved)
