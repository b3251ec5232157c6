"""What one task does: fit a volume's feature space, or compute (and write) the features of one slice.

These are plain functions of picklable arguments, run the same way by a Dask worker, a notebook's local
scheduler and the in-process run without Dask. They call the engine exactly as the server does for an
uploaded stack (`service.jobs`): `FeatureSet.fit_space` over every plane of the volume, then
`FeatureSet.blocks` of each plane in that one space, so the result equals the server's.

A slice task writes only the chunks of its own slice, whole, and always the same bytes: it is idempotent,
so Dask may run it again after a worker dies without losing or duplicating anything.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.errors import DinofeatError

from ..engine.attributes import feature_attributes
from ..engine.progress import Advance, run_to_end
from ..engine.space import FeatureSpace
from ..engine.stacks import feature_set, no_check
from .sources import VolumeSource
from .worker_models import where, worker_models


@dataclass(frozen=True)
class FeatureRequest:
    """Which features of which volume, computed where: what every task of a run receives."""

    source: VolumeSource
    computation: FeatureComputation = FeatureComputation()
    device: str = "auto"
    """auto (a worker's first CUDA GPU, else its CPU), cpu or cuda[:N], resolved on each worker."""
    weights: tuple[tuple[str, str], ...] = ()
    """(backbone or "*", weights file) pairs: paths on the workers; none: $DINOFEAT_WEIGHTS there or the cached download."""

    @property
    def feature_set(self) -> str:
        return self.computation.feature_set

    def models(self):
        return worker_models(self.device, dict(self.weights))


@dataclass(frozen=True)
class FittedVolume:
    """A request with its fitted space: all a slice task needs (sent once to every worker)."""

    request: FeatureRequest
    space: FeatureSpace
    channel_names: list[str] = field(default_factory=list)
    attributes: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """The features' shape: (C, Z, Y, X), or (C, Y, X) for a 2-D image (the HDF5 output's axis order)."""
        return (len(self.channel_names), *self.request.source.spatial_shape)


def located(error: DinofeatError) -> DinofeatError:
    """The error with the process it happened in ("worker tcp://...: ...") in front."""
    return DinofeatError(f"{where()}: {error}")


def fit_volume(request: FeatureRequest, like: FeatureSpace | None = None) -> FittedVolume:
    """The volume's feature space, fitted over all its planes (read one at a time) as the server fits an uploaded
    stack's, or `like` checked against these features; with the channel names and the store's metadata."""
    source = request.source
    fset = feature_set(request.feature_set)
    try:
        models = request.models()
        names = fset.channel_names(source.channels, request.computation, models)  # loads a deep set's model
        identity = fset.identity(source.channels, request.computation, models)
        if like is not None:
            like.check_identity(identity)
            space = like
        else:
            space = run_to_end(fset.fit_space(source.lazy_planes(), models.device, request.computation, models))
    except DinofeatError as error:
        raise located(error) from None
    attributes = feature_attributes(fset, request.computation, models, names, space, source.volume,
                                    {"source": source.path, "source_shape": list(source.shape if source.volume else source.shape[1:]),
                                     "source_dtype": source.dtype})
    return FittedVolume(request, space, names, attributes)


def slice_blocks(fitted: FittedVolume, z: int):
    """(first row, first column, (C, rows, columns)) blocks of slice z in the fitted space."""
    request = fitted.request
    fset = feature_set(request.feature_set)
    try:
        models = request.models()
        plane = request.source.plane(z)
        for item in fset.blocks(plane, models.device, request.computation, models, no_check, fitted.space):
            if not isinstance(item, Advance):
                yield item
    except DinofeatError as error:
        raise located(error) from None


def slice_features(fitted: FittedVolume, z: int) -> np.ndarray:
    """The whole (C, Y, X) float32 features of slice z."""
    out = np.empty((len(fitted.channel_names), *fitted.request.source.shape[1:3]), np.float32)
    for y0, x0, block in slice_blocks(fitted, z):
        out[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block
    return out


def write_slice(z: int, fitted: FittedVolume, store: str) -> tuple[int, float]:
    """Compute slice z and write its chunks into the store at `store` (and nothing else); (z, seconds)."""
    from .zarr_io import open_level, write_block

    start = time.perf_counter()
    array = open_level(Path(store))
    with torch.inference_mode():
        for y0, x0, block in slice_blocks(fitted, z):
            write_block(array, z if fitted.request.source.volume else None, y0, x0, block)
    return z, time.perf_counter() - start


def source_problem(source: VolumeSource) -> str | None:
    """Why this process cannot read the volume (None when it can): for the check on every worker before a run."""
    return source.check_readable()


def weights_problem(request: FeatureRequest) -> str | None:
    """Why this process lacks the weights a deep set needs (None when it has them or the set needs none), without
    downloading anything."""
    if not feature_set(request.feature_set).deep:
        return None
    from ..engine.weights import cache_dir, official_url

    backbone = request.computation.backbone
    weights = dict(request.weights)
    chosen = weights.get(backbone) or weights.get("*") or os.environ.get("DINOFEAT_WEIGHTS")
    if chosen:
        return None if Path(chosen).is_file() else f"lacks the weights file {chosen} for {backbone}"
    cached = cache_dir() / official_url(backbone).rsplit("/", 1)[1]
    if cached.is_file():
        return None
    return (f"lacks the weights of {backbone} ({cached.name}: not in its cache {cached.parent}, no --weights, no "
            "$DINOFEAT_WEIGHTS)")
