"""The features of one request on the worker computing them: the dataset's feature space, then its blocks,
slice by slice, with progress, kept between two passes when they fit.

Plain generators that run in a worker thread (see streaming.messages_from_thread). They yield pb.Progress
messages between steps and return their results (`space = yield from features.space(...)`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import image_axes, image_channels, spatial_shape
from dinofeat.v1 import feature_service_pb2 as pb

from ..engine.lending import in_plan_order
from ..engine.progress import Advance, relayed
from ..engine.space import FeatureSpace
from ..engine.stacks import FeatureSet, Models
from .device_pool import WorkerModels
from .streaming import Cancelled, progress_of

Block = tuple[int, int, int, np.ndarray]
"""(slice, first row, first column, features (C, rows, columns)) of one image, on whole chunks."""
KEEP_BYTES = 256 << 20
"""Features of a dataset are kept between two passes (train then predict, sample then label) when they
fit this; larger datasets are computed again, tile by tile, rather than held whole."""


def cancel_check(cancelled: threading.Event) -> Callable[[], None]:
    """A check for the engine to call between views and strips: stop when the client has gone."""
    def check() -> None:
        if cancelled.is_set():
            raise Cancelled()
    return check


def slices_of(image: np.ndarray) -> list[np.ndarray]:
    """The 2-D (greyscale or RGB) slices of an image or stack (views, no copies)."""
    return list(image) if image_axes(image).startswith("z") else [image]


def stack_shape(channels: int, image: np.ndarray) -> tuple[int, ...]:
    """(C, Y, X) for a 2-D image, (C, Z, Y, X) for a stack."""
    return (channels, *spatial_shape(image))


def stack_bytes(image: np.ndarray, channels: int) -> int:
    """Bytes of the float32 features of `image` with `channels` channels."""
    return channels * int(np.prod(spatial_shape(image))) * 4


def block_origin(volume: bool, z: int, y0: int, x0: int = 0) -> tuple[int, ...]:
    """Where a block of slice z starts in its dataset: (0, y0, x0), or (0, z, y0, x0) for a stack."""
    return (0, z, y0, x0) if volume else (0, y0, x0)


def check_weights(computation: FeatureComputation, served: str) -> None:
    """Refuse a computation that names other weights than the ones this server computes with."""
    if computation.weights_sha256 and served and computation.weights_sha256 != served:
        raise DinofeatError(f"the features were described with {computation.backbone} weights of sha256 "
                            f"{computation.weights_sha256[:12]}..., but this server's are {served[:12]}...; give the same "
                            "weights file (--weights), or compute the features again without the stored description.")


@dataclass(frozen=True)
class WorkerFeatures:
    """A request's feature set and computation on the worker that computes them: its models and device, and
    the check that stops the work once the client has gone."""

    fset: FeatureSet
    computation: FeatureComputation
    models: Models
    device: torch.device
    check: Callable[[], None]

    def names(self, image: np.ndarray) -> list[str]:
        """The channel names of `image`'s features (loads the model of a deep set)."""
        return self.fset.channel_names(image_channels(image), self.computation, self.models)

    def channels(self, image: np.ndarray) -> int:
        return len(self.names(image))

    def space(self, images: list[np.ndarray], like: FeatureSpace | None = None) -> Generator[pb.Progress, None, FeatureSpace]:
        """The dataset's feature space: `like` (checked against these features) or fitted over every slice of `images`."""
        identity = self.fset.identity(image_channels(images[0]), self.computation, self.models)  # loads a deep set's model
        check_weights(self.computation, identity["weights_sha256"])
        if like is not None:
            like.check_identity(identity)
            return like
        planes = [plane for image in images for plane in slices_of(image)]
        return (yield from relayed(self.fset.fit_space(planes, self.device, self.computation, self.models, self.check),
                                   progress_of))

    def blocks(self, image: np.ndarray, space: FeatureSpace, prefix: str = "") -> Iterator[pb.Progress | Block]:
        """Every block of every slice of `image` in `space`, in slice order, with progress (tiles for deep sets,
        rows otherwise). On a pool, slices ahead go whole to idle workers (see lent_slice and engine/lending.py),
        never the last one left; at most spare_count + 2 slices are held."""
        slices = slices_of(image)

        def here(z: int, models: Models = self.models, device: torch.device = self.device) -> Iterator[pb.Progress | Block]:
            label = f"{prefix}slice {z + 1}/{len(slices)}: " if len(slices) > 1 else prefix
            return self.slice_blocks(slices[z], z, space, label, models, device)

        lend = self.lent_slice(image, here)
        most_ahead = self.models.spare_count if lend is not None else 0
        return in_plan_order(len(slices), here, lend, most_ahead, lambda item: isinstance(item, pb.Progress))

    def slice_blocks(self, plane: np.ndarray, z: int, space: FeatureSpace, label: str, models: Models,
                     device: torch.device) -> Iterator[pb.Progress | Block]:
        """The blocks of slice `z` (on `models` and `device`: this worker's, or one it was lent) with progress
        labelled `label`."""
        rows = plane.shape[0]
        for item in self.fset.blocks(plane, device, self.computation, models, self.check, space):
            if isinstance(item, Advance):
                yield progress_of(item, label)
            else:
                y0, x0, block = item
                if not self.fset.deep:
                    yield pb.Progress(stage=f"{label}rows", done=y0 + block.shape[1], total=rows)
                yield z, y0, x0, block

    def lent_slice(self, image: np.ndarray, here: Callable[..., Iterator]) -> Callable[[int], Future[list]] | None:
        """On a pool with idle workers to lend (`models` a WorkerModels), a function starting slice z on an idle
        worker (its items, computed whole: None when none is idle); None for one slice, no pool, or slices whose
        features exceed one worker's memory budget (their tiles are lent instead)."""
        models = self.models
        if not isinstance(models, WorkerModels) or not models.spare_count or not image_axes(image).startswith("z") or len(image) < 2:
            return None
        if stack_bytes(image[0], self.channels(image)) > models.budget_bytes:
            return None
        return lambda z: models.lend(lambda device, lent: list(here(z, lent, device)))

    def slice_stacks(self, image: np.ndarray, space: FeatureSpace, stage: str = "") -> Generator[pb.Progress, None, list[np.ndarray]]:
        """Progress messages; returns the whole (C, Y, X) feature stack of each slice of `image` (for few-shot)."""
        height, width = spatial_shape(image)[-2:]
        stacks, stack, filled = [], None, 0
        for item in self.blocks(image, space, stage):
            if isinstance(item, pb.Progress):
                yield item
                continue
            z, y0, x0, block = item
            stack = np.empty((block.shape[0], height, width), np.float32) if stack is None else stack
            stack[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block
            filled += block.shape[1] * block.shape[2]
            if filled == height * width:
                stacks.append(stack)
                stack, filled = None, 0
        return stacks


@dataclass
class BlockPasses:
    """The blocks of one image in one space for several passes: kept after the first pass when they fit
    KEEP_BYTES, else computed again tile by tile, each of the `planned` passes then reported as its own stage
    ("pass 2/2: rows"), so that progress never goes back and the client can count the pass still to come."""

    features: WorkerFeatures
    image: np.ndarray
    space: FeatureSpace
    prefix: str = ""
    planned: int = 1
    passes: int = 0
    kept: list[Block] | None = field(init=False)

    def __post_init__(self) -> None:
        self.kept = [] if stack_bytes(self.image, self.features.channels(self.image)) <= KEEP_BYTES else None

    @classmethod
    def of_blocks(cls, features: WorkerFeatures, image: np.ndarray, space: FeatureSpace, blocks: tuple[Block, ...]) -> BlockPasses:
        """Passes over blocks computed before (by an earlier request on the same image): no pass computes them again."""
        passes = cls(features, image, space, passes=1)
        passes.kept = list(blocks)
        return passes

    def __call__(self) -> Iterator[pb.Progress | Block]:
        if self.passes and self.kept is not None:
            yield from self.kept
            return
        self.passes += 1
        prefix = f"pass {self.passes}/{self.planned}: {self.prefix}" if self.kept is None and self.planned > 1 else self.prefix
        for item in self.features.blocks(self.image, self.space, prefix):
            if self.kept is not None and not isinstance(item, pb.Progress):
                self.kept.append(item)
            yield item
