"""Loaded DINOv2 and DINOv3 models: one per (backbone, device), loaded on first use and shared by all requests.

Nothing here holds a lock that Status waits on while weights download or load: the registry's own lock
guards only its tables (microseconds), and each backbone loads under a lock of its own, on the worker
thread of the request that asked for it, so only requests for that same backbone wait for it. A server
may load only the backbones its limits allow (`backbones`), and keeps its loaded models within a memory
budget (`backbones_gb` per device): the least recently used model that no running request holds goes
first. A request holds the models it used until it ends (`hold`, `release`: device_pool.WorkerModels).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
from dinofeat.contract.errors import DinofeatError

from .deep import DEFAULT_BUDGET_BYTES, DeepExtractor
from .weights import (
    BACKBONES,
    check_backbone,
    check_device_for,
    file_sha256,
    load_backbone,
    official_config,
    resolve_weights,
)

NO_MEMORY_LIMIT = 1 << 62
"""The memory budget of a registry that never evicts (volume workers, notebooks)."""


def model_bytes(extractor: DeepExtractor) -> int:
    """Memory a loaded model takes: its parameters and buffers."""
    tensors = [*extractor.model.parameters(), *extractor.model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class ModelRegistry:
    """Backbone name -> loaded extractor on one device (a server's pool holds one registry per device).

    `weights` maps backbone names to local files; the key "*" applies to any backbone without its own
    entry. Backbones with neither come from $DINOFEAT_WEIGHTS or the cached official download. The key "anyup"
    names the AnyUp upsampler's weights (engine/anyup.py).
    `allowed`: the backbones this registry may load (others are refused in one sentence);
    `memory_bytes`: what its loaded models may take together (least recently used, unheld, go first).
    """

    def __init__(self, device: torch.device, weights: dict[str, str] | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 *, allowed: tuple[str, ...] = BACKBONES, memory_bytes: int = NO_MEMORY_LIMIT):
        self.device = device
        self.weights = dict(weights or {})
        self.budget_bytes = budget_bytes
        self.allowed = tuple(allowed)
        self.memory_bytes = memory_bytes
        self._extractors: OrderedDict[str, DeepExtractor] = OrderedDict()
        """Loaded models, least recently used first."""
        self._sizes: dict[str, int] = {}
        self._checksums: dict[str, str] = {}
        self._holds: dict[str, int] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        """Guards the tables above only; never held while a model downloads or loads."""

    def check_allowed(self, backbone: str) -> None:
        """Refuse an unknown backbone, or one this server does not offer, in one sentence."""
        check_backbone(backbone)
        check_device_for(official_config(backbone), self.device, backbone)  # before 27 GB of weights load
        if backbone not in self.allowed:
            raise DinofeatError(f"this server does not offer the backbone {backbone!r}; choose one of {', '.join(self.allowed)} "
                                "(the server's backbones setting).")

    def extractor(self, backbone: str) -> DeepExtractor:
        """The loaded model of `backbone`, loading it first (download included) off any shared lock."""
        self.check_allowed(backbone)
        found = self._recently_used(backbone)
        if found is not None:
            return found
        with self._load_lock(backbone):  # requests for this backbone wait here, on their worker threads
            found = self._recently_used(backbone)
            if found is not None:
                return found
            path = resolve_weights(backbone, self.weights.get(backbone) or self.weights.get("*"))
            loaded = DeepExtractor(load_backbone(path, backbone), self.device, self.budget_bytes, anyup_weights=self.weights.get("anyup"))
            checksum = file_sha256(Path(path))
            with self._lock:
                self._extractors[backbone] = loaded
                self._sizes[backbone] = model_bytes(loaded)
                self._checksums[backbone] = checksum
                self._evict()
            return loaded

    def _recently_used(self, backbone: str) -> DeepExtractor | None:
        """The loaded model of `backbone`, marked most recently used, or None when it is not loaded."""
        with self._lock:
            found = self._extractors.get(backbone)
            if found is not None:
                self._extractors.move_to_end(backbone)
            return found

    def _load_lock(self, backbone: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(backbone, threading.Lock())

    def _evict(self) -> None:
        """Drop least recently used models no request holds until the loaded ones fit the memory budget
        (called under the lock). Held models stay even beyond it and go once released; the most recently
        used one always stays, so a model larger than the whole budget is kept alone rather than reloaded."""
        for backbone in list(self._extractors)[:-1]:
            if sum(self._sizes.values()) <= self.memory_bytes:
                return
            if not self._holds.get(backbone):
                del self._extractors[backbone], self._sizes[backbone]

    def hold(self, backbone: str) -> None:
        """A running request uses `backbone`: its model is not evicted until `release`."""
        with self._lock:
            self._holds[backbone] = self._holds.get(backbone, 0) + 1

    def release(self, backbone: str) -> None:
        """A request that held `backbone` ended; models beyond the memory budget may go now."""
        with self._lock:
            self._holds[backbone] -= 1
            if not self._holds[backbone]:
                del self._holds[backbone]
            self._evict()

    def weights_sha256(self, backbone: str) -> str:
        self.extractor(backbone)
        return self._checksums[backbone]

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._extractors)

    def loaded_bytes(self) -> int:
        """Memory the loaded models take together."""
        with self._lock:
            return sum(self._sizes.values())


def pick_device(name: str = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinofeatError(f"device {name!r} was asked for but this machine has no usable CUDA GPU; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DinofeatError(f"unknown device {name!r}; use auto, cpu or cuda[:N].") from None
