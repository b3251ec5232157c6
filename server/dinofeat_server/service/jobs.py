"""The work behind each streaming call: a `Job` binds a work function to its request, and the scheduler runs it
on the worker it grants (engine and classifier in, DatasetStream or TrainReply messages out).

Plain generators that run in a worker thread (see streaming.messages_from_thread); nothing here knows about
gRPC beyond the message types. The features come from blocks.py, the classifier from training.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from dinofeat import __version__
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.images import image_axes, image_sha256, spatial_shape
from dinofeat.contract.wire import (
    MAX_MESSAGE_BYTES,
    apply_result_key,
    axistags,
    feature_layout,
    result_key,
    segment_result_key,
)
from dinofeat.v1 import feature_service_pb2 as pb

from ..engine.attributes import feature_attributes
from ..engine.progress import relayed
from ..engine.space import FeatureSpace
from ..engine.stacks import FeatureSet, Models, feature_set
from ..segment.classifiers import check_training_size, class_probabilities, with_threads
from ..segment.fewshot import (
    Shot,
    keeps_one_component,
    segment_query,
    standardise_by_support,
    to_grid,
    volume_support_slices,
)
from ..segment.unsupervised import analysis_labeller, strided_pixels
from .blocks import Block, BlockPasses, WorkerFeatures, block_origin, cancel_check, stack_shape
from .feature_memory import FeatureMemory, Remembered
from .result_cache import ResultCache
from .streaming import as_stream, dataset_messages, only_chunks, progress_message
from .training import Trained, Training, train_model

if TYPE_CHECKING:
    from ..segment.model_file import TrainedModel
# segment.model_file is imported only where a model file is written (train_work): it loads skops, which
# scans scikit-learn at import (about a second on a small CPU) and which `dinofeat segment` never needs.

ANALYSIS_SAMPLE_PIXELS = 100_000
"""Pixels (evenly strided over all blocks) that k-means, the PCA picture and the foreground threshold are fitted on."""


@dataclass(frozen=True)
class Job:
    """One streaming call's work bound to its request: `work(features, cancelled, **arguments)` yields its messages
    on the worker the scheduler grants, `features` being `fset` and `computation` on that worker. `images` are what
    it computes on, for the scheduler's estimate of its size (scheduler.estimated_work)."""

    work: Callable[..., Iterator]
    fset: FeatureSet
    computation: FeatureComputation
    images: tuple[np.ndarray, ...]
    arguments: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.work.__name__

    def __call__(self, models: Models, device: torch.device, cancelled: threading.Event) -> Iterator:
        features = WorkerFeatures(self.fset, self.computation, models, device, cancel_check(cancelled))
        return self.work(features, cancelled, **self.arguments)


def feature_work(features: WorkerFeatures, cancelled: threading.Event, image: np.ndarray, encoding: pb.Encoding, key: str,
                 like: FeatureSpace | None = None, fit_images: list[np.ndarray] | None = None) -> Iterator[pb.DatasetStream]:
    """Fit (or take) the dataset's space, then compute the features tile by tile and stream them as the dataset
    "features", stamped with the result `key` (wire.features_result_key)."""
    yield progress_message("loading", 0, 1)
    names = features.names(image)  # loads the model of a deep set
    yield progress_message("loading", 1, 1)
    space = yield from as_stream(features.space(fit_images or [image], like))
    layout = feature_layout("features", stack_shape(len(names), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4
    attributes = feature_attributes(features.fset, features.computation, features.models, names, space, volume,
                                    {"source_sha256": image_sha256(image), "source_shape": list(image.shape),
                                     "source_dtype": image.dtype.name})
    yield from dataset_messages(layout, attributes, key, dataset_blocks(features.blocks(image, space), volume), cancelled,
                                "features")


def feature_stream(features: WorkerFeatures, cancelled: threading.Event, image: np.ndarray, encoding: pb.Encoding, key: str,
                   cache: ResultCache | None = None, wanted: set[int] | None = None, like: FeatureSpace | None = None,
                   fit_images: list[np.ndarray] | None = None) -> Iterator[pb.DatasetStream]:
    """feature_work through the result cache (keyed by the result `key` and the weights' checksum), keeping only
    the chunks a resuming client asked for."""
    def compute() -> Iterator[pb.DatasetStream]:
        return feature_work(features, cancelled, image, encoding, key, like, fit_images)

    if cache is None:
        yield from only_chunks(compute(), wanted)
        return
    weights = features.fset.weights_sha256(features.computation, features.models)
    yield from only_chunks(cache.stream(result_key(key, weights), compute, cancelled), wanted)


def dataset_blocks(items: Iterator[pb.Progress | Block], volume: bool,
                   compute: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[pb.Progress | tuple]:
    """Blocks placed in their dataset ((origin, block) pairs, a stack's with its Z axis), each computed from
    the features by `compute` when given (probabilities, labels); progress passed on."""
    for item in items:
        if isinstance(item, pb.Progress):
            yield item
            continue
        z, y0, x0, block = item
        block = compute(block) if compute else block
        yield block_origin(volume, z, y0, x0), block[:, None] if volume else block


def probability_messages(trained: Trained, image: np.ndarray, image_sha: str, blocks_in: Iterator[pb.Progress | Block],
                         encoding: pb.Encoding, key: str, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Stream the per-class probabilities of every block of `image` (content address `image_sha`) as the dataset
    "probabilities"."""
    classifier, metadata = trained
    values = metadata["class_values"]
    layout = feature_layout("probabilities", stack_shape(len(values), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4
    attributes = {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": [f"class_{v}" for v in values],
        "class_values": values,
        "feature_set": metadata["feature_spec"],
        "classifier": metadata["classifier"],
        "labelled_pixels": metadata["labelled_pixels"],
        "dinofeat_version": __version__,
        "source_sha256": image_sha,
    }
    blocks = dataset_blocks(blocks_in, volume, lambda features: class_probabilities(classifier, features))
    yield from dataset_messages(layout, attributes, key, blocks, cancelled, "probabilities")


def segment_work(features: WorkerFeatures, cancelled: threading.Event, image: np.ndarray, labels: np.ndarray,
                 training: Training, encoding: pb.Encoding, memory: FeatureMemory | None = None) -> Iterator[pb.DatasetStream]:
    """Train on the image's own labels and stream its class probabilities (features kept between the two passes when
    small, else computed again tile by tile). Kept features go to `memory`, and come from it when the same image is
    segmented again in the same computation (new scribbles): then neither the space nor the features are computed."""
    check_training_size([labels], training.kind, training.trees, training.max_training_gb)
    image_sha = image_sha256(image)  # once: the memory's key, the result key and the probabilities' source
    remembered_as = (image_sha, features.computation.key(), features.fset.weights_sha256(features.computation, features.models))
    remembered = memory.get(remembered_as) if memory is not None else None
    if remembered is not None:
        space, passes = remembered.space, BlockPasses.of_blocks(features, image, remembered.space, remembered.blocks)
    else:
        space = yield from as_stream(features.space([image]))
        passes = BlockPasses(features, image, space, planned=2)
    trained = yield from as_stream(train_model(features, [image], [labels], training, [passes], like=space))
    if memory is not None and remembered is None and passes.kept is not None:
        memory.put(remembered_as, Remembered(space, tuple(passes.kept)))
    key = segment_result_key(image_sha, image_sha256(labels), features.computation, training.kind, training.trees, training.seed)
    yield from probability_messages(trained, image, image_sha, passes(), encoding, key, cancelled)


def train_work(features: WorkerFeatures, cancelled: threading.Event, images: list[np.ndarray], labels: list[np.ndarray],
               training: Training) -> Iterator[pb.TrainReply]:
    """Train on several images in one space and stream the model file back in pieces, then its summary."""
    from ..segment.model_file import TrainedModel, model_bytes

    check_training_size(labels, training.kind, training.trees, training.max_training_gb)
    trained = yield from relayed(train_model(features, images, labels, training), lambda message: pb.TrainReply(progress=message))
    model = TrainedModel(*trained)
    data = model_bytes(model)
    for start in range(0, len(data), MAX_MESSAGE_BYTES):
        yield pb.TrainReply(model_piece=data[start : start + MAX_MESSAGE_BYTES])
    meta = model.metadata
    yield pb.TrainReply(summary=pb.ModelSummary(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), class_values=meta["class_values"],
                                                labelled_pixels=meta["labelled_pixels"], classifier=meta["classifier"]["kind"]))


def apply_work(features: WorkerFeatures, cancelled: threading.Event, model: TrainedModel, model_sha: str, image: np.ndarray,
               encoding: pb.Encoding, threads: int = -1) -> Iterator[pb.DatasetStream]:
    """Compute the model's features of a new image in the model's own space and stream the class probabilities
    block by block (a forest predicts on `threads` threads, whatever its file says)."""
    model.check_features(features.fset.name, features.channels(image))
    space = yield from as_stream(features.space([image], model.space()))
    image_sha = image_sha256(image)
    yield from probability_messages((with_threads(model.classifier, threads), model.metadata), image, image_sha,
                                    features.blocks(image, space), encoding, apply_result_key(model_sha, image_sha), cancelled)


def analyse_work(features: WorkerFeatures, cancelled: threading.Event, image: np.ndarray, analysis: str, clusters: int,
                 seed: int) -> Iterator[pb.DatasetStream]:
    """k-means labels, a PCA picture or an attention foreground mask, fitted on a sample of every slice's
    features in one space, then computed block by block as one dataset."""
    if analysis == "foreground":
        features = dataclasses.replace(features, fset=feature_set("attention"))
    space = yield from as_stream(features.space([image]))
    passes = BlockPasses(features, image, space, planned=2)
    step = max(1, int(np.prod(spatial_shape(image))) // ANALYSIS_SAMPLE_PIXELS)
    sample = []
    for item in passes():
        if isinstance(item, pb.Progress):
            yield pb.DatasetStream(progress=item)
        else:
            sample.append(strided_pixels(item[3], step))
    yield progress_message("fitting", 0, 1)
    label = analysis_labeller(analysis, np.concatenate(sample), clusters, seed)
    yield progress_message("fitting", 1, 1)
    name, dtype, names = {"kmeans": ("labels", "uint16", ["cluster"]), "pca": ("picture", "uint8", ["pc1", "pc2", "pc3"]),
                          "foreground": ("mask", "uint8", ["foreground"])}[analysis]
    layout = feature_layout(name, stack_shape(len(names), image), dtype=dtype)
    volume = len(layout.shape) == 4
    image_sha = image_sha256(image)
    attributes = {"axistags": axistags("czyx" if volume else "cyx"), "channel_names": names, "dinofeat_version": __version__,
                  "source_sha256": image_sha, "analysis": analysis, "clusters": clusters, "seed": seed,
                  "feature_set": features.fset.spec(features.computation)}
    key = result_key(analysis, image_sha, features.computation.key(), clusters, seed)
    yield from dataset_messages(layout, attributes, key, dataset_blocks(passes(), volume, label), cancelled, name)


def fewshot_work(features: WorkerFeatures, cancelled: threading.Event, supports: list[np.ndarray], masks: list[np.ndarray],
                 query: np.ndarray, window: int, grid: int, components: str) -> Iterator[pb.DatasetStream]:
    """Few-shot segmentation of every slice of the query: dataset "fewshot" with channels [mask, foreground_probability].

    A stack as the single support follows the volume protocol (three sections, middle slices)."""
    space = yield from as_stream(features.space([*supports, query]))
    support_stacks: list[np.ndarray] = []
    for image in supports:
        support_stacks += yield from as_stream(features.slice_stacks(image, space, "support: "))
    support_masks = [m for mask in masks for m in (list(mask) if mask.ndim == 3 else [mask])]
    one_component = keeps_one_component(support_masks, components)
    query_stacks = yield from as_stream(features.slice_stacks(query, space, "query: "))
    support_tensors, query_tensors = standardise_by_support([torch.from_numpy(f) for f in support_stacks],
                                                            [torch.from_numpy(f) for f in query_stacks])
    shots = []
    for stack, mask in zip(support_tensors, support_masks):
        cells, share = to_grid(stack, torch.from_numpy(mask != 0), grid)
        shots.append(Shot(cells, share))
    volume = len(supports) == 1 and supports[0].ndim >= 3 and image_axes(supports[0]).startswith("z")
    chosen = volume_support_slices(np.stack(support_masks), len(query_tensors)) if volume else None
    results = []
    for z, stack in enumerate(query_tensors):
        features.check()
        cells, _ = to_grid(stack, None, grid)
        slice_shots = [shots[chosen[z]]] if volume else [s for s in shots if s.foreground.max() > 0]
        probability, mask = segment_query(cells, slice_shots, tuple(stack.shape[-2:]), window, one_component)
        results.append(np.stack([mask.astype(np.float32), probability]))
        yield pb.DatasetStream(progress=pb.Progress(stage="segmenting", done=z + 1, total=len(query_tensors)))
    yield from whole_dataset("fewshot", "float32", ["mask", "foreground_probability"], results, query, cancelled,
                             {"window": window, "grid": grid, "components": components,
                              "kept": "most_confident" if one_component else "all", "shots": len(shots),
                              "feature_set": features.fset.spec(features.computation)},
                             result_key("fewshot", image_sha256(query), [image_sha256(s) for s in supports],
                                        [image_sha256(m) for m in masks], features.computation.key(), window, grid, components))


def whole_dataset(name: str, dtype: str, channels: list[str], slices: list[np.ndarray], image: np.ndarray,
                  cancelled: threading.Event, extra: dict, key: str) -> Iterator[pb.DatasetStream]:
    """Stream per-slice results (K, Y, X) as one (K, Y, X) or (K, Z, Y, X) dataset."""
    layout = feature_layout(name, stack_shape(len(channels), image), dtype=dtype)
    volume = len(layout.shape) == 4
    blocks = ((block_origin(volume, z, 0), s[:, None] if volume else s) for z, s in enumerate(slices))
    attributes = {"axistags": axistags("czyx" if volume else "cyx"), "channel_names": channels,
                  "dinofeat_version": __version__, "source_sha256": image_sha256(image), **extra}
    yield from dataset_messages(layout, attributes, key, blocks, cancelled, name)
