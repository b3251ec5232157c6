"""The feature stacks of the images a server segmented last, kept in memory so that the next scribbles on the same
image (napari's live mode, a Fiji user adding strokes) train and predict without computing the features again.

Keyed by the image's sha256, the description of the computation and the served weights; holds only stacks that
BlockPasses keeps anyway (at most KEEP_BYTES each), within MEMORY_BYTES in all, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..engine.space import FeatureSpace
from .blocks import Block

MEMORY_BYTES = 512 << 20
"""Feature stacks kept between requests, in all (two 256 MiB stacks: a 2048 x 2048 image's 16 channels, or a 1024 x
1024 image's 53 multiscale channels, with room to spare)."""


@dataclass(frozen=True)
class Remembered:
    """One image's features in one computation: its fitted space and every block, in the order they were computed."""

    space: FeatureSpace
    blocks: tuple[Block, ...]

    @property
    def nbytes(self) -> int:
        return sum(block[3].nbytes for block in self.blocks)


class FeatureMemory:
    """A thread-safe LRU of Remembered feature stacks within `budget_bytes`."""

    def __init__(self, budget_bytes: int = MEMORY_BYTES):
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[tuple, Remembered] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Remembered | None:
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
            return found

    def put(self, key: tuple, remembered: Remembered) -> None:
        """Keep `remembered`, dropping the least recently used stacks beyond the budget (a stack larger than the
        whole budget is not kept)."""
        if remembered.nbytes > self.budget_bytes:
            return
        with self._lock:
            self._kept[key] = remembered
            self._kept.move_to_end(key)
            while sum(kept.nbytes for kept in self._kept.values()) > self.budget_bytes:
                self._kept.popitem(last=False)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(kept.nbytes for kept in self._kept.values())
