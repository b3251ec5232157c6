"""Loaded DINOv2 models: one per (backbone, device), loaded on first use and shared by all requests."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..engine.deep import DEFAULT_BUDGET_BYTES, DeepExtractor
from ..engine.weights import check_backbone, file_sha256, load_backbone, resolve_weights


class ModelRegistry:
    """Backbone name -> loaded extractor on one device (a server's pool holds one registry per device).

    `weights` maps backbone names to local files; the key "*" applies to any backbone without its own
    entry. Backbones with neither come from $DINOFEAT_WEIGHTS or the cached official download.
    """

    def __init__(self, device: torch.device, weights: dict[str, str] | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device = device
        self.weights = dict(weights or {})
        self.budget_bytes = budget_bytes
        self._extractors: dict[str, DeepExtractor] = {}
        self._checksums: dict[str, str] = {}
        self._lock = threading.Lock()

    def extractor(self, backbone: str) -> DeepExtractor:
        check_backbone(backbone)
        with self._lock:
            if backbone not in self._extractors:
                path = resolve_weights(backbone, self.weights.get(backbone) or self.weights.get("*"))
                self._extractors[backbone] = DeepExtractor(load_backbone(path), self.device, self.budget_bytes)
                self._checksums[backbone] = file_sha256(Path(path))
            return self._extractors[backbone]

    def weights_sha256(self, backbone: str) -> str:
        self.extractor(backbone)
        return self._checksums[backbone]

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._extractors)
