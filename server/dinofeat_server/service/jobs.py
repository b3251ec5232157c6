"""The work behind each streaming call: engine and classifier in, DatasetStream messages out.

Plain generators that run in a worker thread (see streaming.messages_from_thread); nothing here
knows about gRPC beyond the message types.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.contract.computation import FeatureComputation
from dinofeat import __version__
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import image_axes, image_channels, image_sha256, spatial_shape
from dinofeat.contract.wire import (
    MAX_MESSAGE_BYTES,
    apply_result_key,
    axistags,
    feature_layout,
    result_key,
    segment_result_key,
)

from ..engine.lending import in_plan_order
from ..engine.progress import Advance
from ..engine.space import FeatureSpace
from ..engine.stacks import (
    FeatureSet,
    Models,
    feature_set,
)
from ..segment.classifiers import (
    DEFAULT_TREES,
    check_training_size,
    class_probabilities,
    class_values,
    forest_limits,
    labelled_pixels,
    train_classifier,
)
from ..segment.fewshot import (
    Shot,
    keeps_one_component,
    segment_query,
    standardise_by_support,
    to_grid,
    volume_support_slices,
)
from ..segment.unsupervised import analysis_labeller, strided_pixels
from .device_pool import WorkerModels
from .result_cache import ResultCache
from .streaming import Cancelled, dataset_messages, only_chunks, progress_message

if TYPE_CHECKING:
    from sklearn.base import ClassifierMixin

    from ..segment.model_file import TrainedModel
# segment.model_file is imported only where a model file is written (train_work): it loads skops, which
# scans scikit-learn at import (about a second on a small CPU) and which `dinofeat segment` never needs.


def cancel_check(cancelled: threading.Event):
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


ANALYSES = ("kmeans", "pca", "foreground")


def attention_set() -> FeatureSet:
    return feature_set("attention")


def block_origin(volume: bool, z: int, y0: int, x0: int = 0) -> tuple[int, ...]:
    return (0, z, y0, x0) if volume else (0, y0, x0)


Result = TypeVar("Result")
KEEP_BYTES = 256 << 20
"""Features of a dataset are kept between two passes (train then predict, sample then label) when they
fit this; larger datasets are computed again, tile by tile, rather than held whole."""


def dataset_planes(images: list[np.ndarray]) -> list[np.ndarray]:
    """Every 2-D slice of every image, in order: what one feature space is fitted over."""
    return [plane for image in images for plane in slices_of(image)]


def progress_of(advance: Advance, prefix: str = "") -> pb.Progress:
    return pb.Progress(stage=f"{prefix}{advance.stage}", done=advance.done, total=advance.total, notice=advance.notice)


def fitted_space(images: list[np.ndarray], fset: FeatureSet, options: FeatureComputation, models: Models, device: torch.device,
                 check, like: FeatureSpace | None = None) -> Generator[pb.Progress, None, FeatureSpace]:
    """The dataset's feature space: `like` (checked against these features) or fitted over all `images`."""
    identity = fset.identity(image_channels(images[0]), options, models)  # loads the model of a deep set
    check_weights(options, identity["weights_sha256"])
    if like is not None:
        like.check_identity(identity)
        return like
    return (yield from relayed(fset.fit_space(dataset_planes(images), device, options, models, check), progress_of))


def check_weights(computation: FeatureComputation, served: str) -> None:
    """Refuse a computation that names other weights than the ones this server computes with."""
    if computation.weights_sha256 and served and computation.weights_sha256 != served:
        raise DinofeatError(f"the features were described with {computation.backbone} weights of sha256 "
                            f"{computation.weights_sha256[:12]}..., but this server's are {served[:12]}...; give the same "
                            "weights file (--weights), or compute the features again without the stored description.")


Block = tuple[int, int, int, np.ndarray]
"""(slice, first row, first column, features (C, rows, columns)) of one image, on whole chunks."""


def image_blocks(image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models, device: torch.device,
                 check, space: FeatureSpace, prefix: str = "") -> Iterator[pb.Progress | Block]:
    """Every block of every slice of `image` in `space`, in slice order, with progress (tiles for deep sets,
    rows otherwise). On a pool, slices ahead go whole to idle workers (see lent_slice and
    engine/lending.py), never the last one left; at most spare_count + 2 slices are held."""
    slices = slices_of(image)

    def here(z: int, models: Models = models, device: torch.device = device) -> Iterator[pb.Progress | Block]:
        label = f"{prefix}slice {z + 1}/{len(slices)}: " if len(slices) > 1 else prefix
        return slice_blocks(slices[z], z, fset, options, models, device, check, space, label)

    lend = lent_slice(image, fset, options, models, here)
    most_ahead = models.spare_count if lend is not None else 0
    return in_plan_order(len(slices), here, lend, most_ahead, lambda item: isinstance(item, pb.Progress))


def slice_blocks(plane: np.ndarray, z: int, fset: FeatureSet, options: FeatureComputation, models: Models, device: torch.device,
                 check, space: FeatureSpace, label: str) -> Iterator[pb.Progress | Block]:
    """The blocks of slice `z` with progress labelled `label`."""
    rows = plane.shape[0]
    for item in fset.blocks(plane, device, options, models, check, space):
        if isinstance(item, Advance):
            yield progress_of(item, label)
        else:
            y0, x0, block = item
            if not fset.deep:
                yield pb.Progress(stage=f"{label}rows", done=y0 + block.shape[1], total=rows)
            yield z, y0, x0, block


def lent_slice(image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models,
               here: Callable[..., Iterator]) -> Callable[[int], Future[list]] | None:
    """On a pool with idle workers to lend (`models` a WorkerModels), a function starting slice z on an idle
    worker (its items, computed whole: None when none is idle); None for one slice, no pool, or slices whose
    features exceed one worker's memory budget (their tiles are lent instead)."""
    if not isinstance(models, WorkerModels) or not models.spare_count or not image_axes(image).startswith("z") or len(image) < 2:
        return None
    if stack_bytes(image[0], len(fset.channel_names(image_channels(image), options, models))) > models.budget_bytes:
        return None
    return lambda z: models.lend(lambda device, lent: list(here(z, lent, device)))


def feature_attributes(image: np.ndarray, image_sha: str, fset: FeatureSet, options: FeatureComputation,
                       models: Models, names: list[str], space: FeatureSpace) -> dict:
    volume = image_axes(image).startswith("z")
    return {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": names,
        "feature_set": fset.spec(options),
        "computation": fset.described(options, space),
        "backbone": options.backbone if fset.deep else "",
        "weights_sha256": fset.weights_sha256(options, models),
        "dinofeat_version": __version__,
        "source_sha256": image_sha,
        "source_shape": list(image.shape),
        "source_dtype": image.dtype.name,
        "feature_space": space.to_dict(),
    }


def feature_work(image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models, encoding: pb.Encoding,
                 key: str, device: torch.device, cancelled: threading.Event, like: FeatureSpace | None = None,
                 fit_images: list[np.ndarray] | None = None) -> Iterator[pb.DatasetStream]:
    """Fit (or take) the dataset's space, then compute `fset` tile by tile and stream it as the dataset "features",
    stamped with the result `key` (wire.features_result_key)."""
    check = cancel_check(cancelled)
    yield progress_message("loading", 0, 1)
    names = fset.channel_names(image_channels(image), options, models)  # loads the model of a deep set
    yield progress_message("loading", 1, 1)
    space = yield from as_stream(fitted_space(fit_images or [image], fset, options, models, device, check, like))
    layout = feature_layout("features", stack_shape(len(names), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4

    def blocks():
        for item in image_blocks(image, fset, options, models, device, check, space):
            if isinstance(item, pb.Progress):
                yield item
            else:
                z, y0, x0, block = item
                yield block_origin(volume, z, y0, x0), block[:, None] if volume else block

    attributes = feature_attributes(image, image_sha256(image), fset, options, models, names, space)
    yield from dataset_messages(layout, attributes, key, blocks(), cancelled, "features")


def feature_stream(cache: ResultCache | None, image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models,
                   encoding: pb.Encoding, key: str, wanted: set[int] | None, device: torch.device,
                   cancelled: threading.Event, like: FeatureSpace | None = None,
                   fit_images: list[np.ndarray] | None = None) -> Iterator[pb.DatasetStream]:
    """feature_work through the result cache (keyed by the result `key` and the weights' checksum), keeping only
    the chunks a resuming client asked for."""
    def compute() -> Iterator[pb.DatasetStream]:
        return feature_work(image, fset, options, models, encoding, key, device, cancelled, like, fit_images)

    if cache is None:
        yield from only_chunks(compute(), wanted)
        return
    weights = fset.weights_sha256(options, models)
    yield from only_chunks(cache.stream(result_key(key, weights), compute, cancelled), wanted)


def slice_features(image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models, device: torch.device,
                   check, space: FeatureSpace, stage: str = "") -> Iterator[pb.Progress | np.ndarray]:
    """Progress messages, then the whole (C, Y, X) feature stack of each slice of `image` (for few-shot)."""
    height, width = spatial_shape(image)[-2:]
    stack, filled = None, 0
    for item in image_blocks(image, fset, options, models, device, check, space, stage):
        if isinstance(item, pb.Progress):
            yield item
            continue
        z, y0, x0, block = item
        stack = np.empty((block.shape[0], height, width), np.float32) if stack is None else stack
        stack[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block
        filled += block.shape[1] * block.shape[2]
        if filled == height * width:
            yield stack
            stack, filled = None, 0


def split_progress(items: Iterator[pb.Progress | np.ndarray], results: list) -> Iterator[pb.Progress]:
    """Pass progress messages on; collect everything else into `results`."""
    for item in items:
        if isinstance(item, pb.Progress):
            yield item
        else:
            results.append(item)


def stack_bytes(image: np.ndarray, channels: int) -> int:
    return channels * int(np.prod(spatial_shape(image))) * 4


class BlockPasses:
    """The blocks of one image in one space for several passes: kept after the first pass when they fit
    KEEP_BYTES, else computed again tile by tile, each of the `planned` passes then reported as its own stage
    ("pass 2/2: rows"), so that progress never goes back and the client can count the pass still to come."""

    def __init__(self, image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models, device: torch.device,
                 check, space: FeatureSpace, channels: int, prefix: str = "", planned: int = 1):
        self.arguments = (image, fset, options, models, device, check, space, prefix)
        self.kept: list[Block] | None = [] if stack_bytes(image, channels) <= KEEP_BYTES else None
        self.passes = 0
        self.planned = planned

    def __call__(self) -> Iterator[pb.Progress | Block]:
        if self.passes and self.kept is not None:
            yield from self.kept
            return
        self.passes += 1
        *arguments, prefix = self.arguments
        if self.kept is None and self.planned > 1:
            prefix = f"pass {self.passes}/{self.planned}: {prefix}"
        for item in image_blocks(*arguments, prefix):
            if self.kept is not None and not isinstance(item, pb.Progress):
                self.kept.append(item)
            yield item


Trained = tuple["ClassifierMixin", dict]
"""A trained classifier and its model file's metadata: what segment.model_file.TrainedModel holds, without
that module (segment predicts with them directly; train_work writes them as a model file)."""


def train_model(images: list[np.ndarray], labels: list[np.ndarray], fset: FeatureSet, options: FeatureComputation, models: Models,
                kind: str, trees: int, seed: int, device: torch.device, check,
                passes: list[BlockPasses] | None = None, like: FeatureSpace | None = None,
                threads: int = -1) -> Generator[pb.Progress, None, Trained]:
    """Fit one space over all images, compute their features block by block, train a classifier on the
    labelled pixels (a forest on `threads` threads; -1: every core). With `passes` given, the images'
    blocks go through them (to predict afterwards). Returns the classifier and its metadata."""
    space = yield from fitted_space(images, fset, options, models, device, check, like)
    channels = len(fset.channel_names(image_channels(images[0]), options, models))
    samples, classes = [], []
    for number, (image, label) in enumerate(zip(images, labels)):
        prefix = f"image {number + 1}/{len(images)}: " if len(images) > 1 else ""
        source = passes[number] if passes else BlockPasses(image, fset, options, models, device, check, space, channels, prefix)
        label_slices = list(label) if label.ndim == 3 else [label]
        for item in source():
            if isinstance(item, pb.Progress):
                yield item
                continue
            z, y0, x0, block = item
            s, c = labelled_pixels(block, label_slices[z][y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]])
            samples.append(s)
            classes.append(c)
    yield pb.Progress(stage="training", done=0, total=1)
    samples, classes = np.concatenate(samples), np.concatenate(classes)
    classifier = train_classifier(samples, classes, kind, trees, seed, threads=threads)
    yield pb.Progress(stage="training", done=1, total=1)
    return classifier, model_metadata(fset, options, channels, space, classifier, kind, trees, seed, len(classes),
                                      [image_sha256(i) for i in images])


def model_metadata(fset: FeatureSet, options: FeatureComputation, channels: int, space: FeatureSpace, classifier: ClassifierMixin,
                   kind: str, trees: int, seed: int, labelled: int, training_images: list[str]) -> dict:
    """What a model file records beside its classifier: the features and their space, the classes, the classifier's
    settings and what it was trained on (images' sha256, or a volume's path)."""
    return {
        "feature_set": fset.name, "computation": fset.described(options, space), "feature_spec": fset.spec(options),
        "channels": channels,
        "feature_space": space.to_dict(),
        "class_values": class_values(classifier), "classifier": {"kind": kind, "trees": trees or DEFAULT_TREES, "seed": seed,
                                                                  "class_weight": "balanced", **forest_limits(classifier)},
        "labelled_pixels": int(labelled), "training_images": training_images,
        "dinofeat_version": __version__,
    }


def probability_messages(trained: Trained, image: np.ndarray, blocks_in: Iterator[pb.Progress | Block], encoding: pb.Encoding,
                         key: str, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Stream the per-class probabilities of every block as the dataset "probabilities"."""
    classifier, metadata = trained
    values = metadata["class_values"]
    layout = feature_layout("probabilities", stack_shape(len(values), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4

    def blocks():
        for item in blocks_in:
            if isinstance(item, pb.Progress):
                yield item
                continue
            z, y0, x0, features = item
            block = class_probabilities(classifier, features)
            yield block_origin(volume, z, y0, x0), block[:, None] if volume else block

    attributes = {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": [f"class_{v}" for v in values],
        "class_values": values,
        "feature_set": metadata["feature_spec"],
        "classifier": metadata["classifier"],
        "labelled_pixels": metadata["labelled_pixels"],
        "dinofeat_version": __version__,
        "source_sha256": image_sha256(image),
    }
    yield from dataset_messages(layout, attributes, key, blocks(), cancelled, "probabilities")


def relayed(messages: Generator[Any, None, Result], wrap: Callable[[Any], Any]) -> Generator[Any, None, Result]:
    """Every message of `messages` wrapped by `wrap`; returns what `messages` returns."""
    while True:
        try:
            message = next(messages)
        except StopIteration as done:
            return done.value
        yield wrap(message)


def as_stream(progress: Generator[pb.Progress, None, Result]) -> Generator[pb.DatasetStream, None, Result]:
    """Progress as DatasetStream messages; returns what the wrapped generator returns."""
    return (yield from relayed(progress, lambda message: pb.DatasetStream(progress=message)))


def segment_work(image: np.ndarray, labels: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models,
                 kind: str, trees: int, seed: int, encoding: pb.Encoding, device: torch.device,
                 cancelled: threading.Event, max_training_gb: float = float("inf"), threads: int = -1) -> Iterator[pb.DatasetStream]:
    """Train on the image's own labels and stream its class probabilities (features kept between the
    two passes when small, else computed again tile by tile); the forest uses `threads` threads."""
    check_training_size([labels], kind, trees, max_training_gb)
    check = cancel_check(cancelled)
    space = yield from as_stream(fitted_space([image], fset, options, models, device, check))
    channels = len(fset.channel_names(image_channels(image), options, models))
    passes = BlockPasses(image, fset, options, models, device, check, space, channels, planned=2)
    trained = yield from as_stream(train_model([image], [labels], fset, options, models, kind, trees, seed, device, check,
                                               [passes], like=space, threads=threads))
    key = segment_result_key(image_sha256(image), image_sha256(labels), options, kind, trees, seed)
    yield from probability_messages(trained, image, passes(), encoding, key, cancelled)


def train_work(images: list[np.ndarray], labels: list[np.ndarray], fset: FeatureSet, options: FeatureComputation, models: Models,
               kind: str, trees: int, seed: int, device: torch.device, cancelled: threading.Event,
               max_training_gb: float = float("inf"), threads: int = -1) -> Iterator[pb.TrainReply]:
    """Train on several images in one space (a forest on `threads` threads) and stream the model file back
    in pieces, then its summary."""
    from ..segment.model_file import TrainedModel, model_bytes

    check_training_size(labels, kind, trees, max_training_gb)
    training = train_model(images, labels, fset, options, models, kind, trees, seed, device, cancel_check(cancelled),
                           threads=threads)
    model = TrainedModel(*(yield from relayed(training, lambda message: pb.TrainReply(progress=message))))
    data = model_bytes(model)
    for start in range(0, len(data), MAX_MESSAGE_BYTES):
        yield pb.TrainReply(model_piece=data[start : start + MAX_MESSAGE_BYTES])
    meta = model.metadata
    yield pb.TrainReply(summary=pb.ModelSummary(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), class_values=meta["class_values"],
                                                labelled_pixels=meta["labelled_pixels"], classifier=meta["classifier"]["kind"]))


def apply_work(model: TrainedModel, model_sha: str, image: np.ndarray, fset: FeatureSet, models: Models, encoding: pb.Encoding,
               device: torch.device, cancelled: threading.Event, threads: int = -1) -> Iterator[pb.DatasetStream]:
    """Compute the model's feature set on a new image in the model's own space and stream the class
    probabilities block by block (a forest predicts on `threads` threads, whatever its file says)."""
    options = model.computation()
    check = cancel_check(cancelled)
    model.check_features(fset.name, len(fset.channel_names(image_channels(image), options, models)))
    space = yield from as_stream(fitted_space([image], fset, options, models, device, check, model.space()))
    key = apply_result_key(model_sha, image_sha256(image))
    yield from probability_messages((with_threads(model.classifier, threads), model.metadata), image,
                                    image_blocks(image, fset, options, models, device, check, space), encoding, key, cancelled)


def with_threads(classifier: ClassifierMixin, threads: int) -> ClassifierMixin:
    """`classifier` predicting on `threads` threads: a forest's n_jobs is the training server's, stored in
    its model file. A shallow copy (the trees are shared), so a model held for other requests is left as it is."""
    if "n_jobs" not in classifier.get_params(deep=False):
        return classifier
    return copy.copy(classifier).set_params(n_jobs=threads)


ANALYSIS_SAMPLE_PIXELS = 100_000
"""Pixels (evenly strided over all blocks) that k-means, the PCA picture and the foreground threshold are fitted on."""


def analyse_work(image: np.ndarray, fset: FeatureSet, options: FeatureComputation, models: Models, analysis: str, clusters: int,
                 seed: int, device: torch.device, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """k-means labels, a PCA picture or an attention foreground mask, fitted on a sample of every slice's
    features in one space, then computed block by block as one dataset."""
    if analysis == "foreground":
        fset = attention_set()
    check = cancel_check(cancelled)
    space = yield from as_stream(fitted_space([image], fset, options, models, device, check))
    channels = len(fset.channel_names(image_channels(image), options, models))
    passes = BlockPasses(image, fset, options, models, device, check, space, channels, planned=2)
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

    def blocks():
        for item in passes():
            if isinstance(item, pb.Progress):
                yield item
                continue
            z, y0, x0, block = item
            out = label(block)
            yield block_origin(volume, z, y0, x0), out[:, None] if volume else out

    attributes = {"axistags": axistags("czyx" if volume else "cyx"), "channel_names": names, "dinofeat_version": __version__,
                  "source_sha256": image_sha256(image), "analysis": analysis, "clusters": clusters, "seed": seed,
                  "feature_set": fset.spec(options)}
    key = result_key(analysis, image_sha256(image), options.key(), clusters, seed)
    yield from dataset_messages(layout, attributes, key, blocks(), cancelled, name)


def fewshot_work(supports: list[np.ndarray], masks: list[np.ndarray], query: np.ndarray, fset: FeatureSet, options: FeatureComputation,
                 models: Models, window: int, grid: int, components: str, device: torch.device,
                 cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Few-shot segmentation of every slice of the query: dataset "fewshot" with channels [mask, foreground_probability].

    A stack as the single support follows the volume protocol (three sections, middle slices)."""
    check = cancel_check(cancelled)
    space = yield from as_stream(fitted_space([*supports, query], fset, options, models, device, check))
    support_stacks: list[np.ndarray] = []
    for image in supports:
        yield from as_stream(split_progress(slice_features(image, fset, options, models, device, check, space, "support: "),
                                            support_stacks))
    support_masks = [m for mask in masks for m in (list(mask) if mask.ndim == 3 else [mask])]
    one_component = keeps_one_component(support_masks, components)
    query_stacks: list[np.ndarray] = []
    yield from as_stream(split_progress(slice_features(query, fset, options, models, device, check, space, "query: "), query_stacks))
    support_tensors, query_tensors = standardise_by_support([torch.from_numpy(f) for f in support_stacks],
                                                            [torch.from_numpy(f) for f in query_stacks])
    shots = []
    for features, mask in zip(support_tensors, support_masks):
        cells, share = to_grid(features, torch.from_numpy(mask != 0), grid)
        shots.append(Shot(cells, share))
    volume = len(supports) == 1 and supports[0].ndim >= 3 and image_axes(supports[0]).startswith("z")
    chosen = volume_support_slices(np.stack(support_masks), len(query_tensors)) if volume else None
    results = []
    for z, features in enumerate(query_tensors):
        check()
        cells, _ = to_grid(features, None, grid)
        slice_shots = [shots[chosen[z]]] if volume else [s for s in shots if s.foreground.max() > 0]
        probability, mask = segment_query(cells, slice_shots, tuple(features.shape[-2:]), window, one_component)
        results.append(np.stack([mask.astype(np.float32), probability]))
        yield pb.DatasetStream(progress=pb.Progress(stage="segmenting", done=z + 1, total=len(query_tensors)))
    yield from whole_dataset("fewshot", "float32", ["mask", "foreground_probability"], results, query, cancelled,
                             {"window": window, "grid": grid, "components": components,
                              "kept": "most_confident" if one_component else "all", "shots": len(shots),
                              "feature_set": fset.spec(options)},
                             result_key("fewshot", image_sha256(query), [image_sha256(s) for s in supports],
                                        [image_sha256(m) for m in masks], options.key(), window, grid, components))


def whole_dataset(name: str, dtype: str, channels: list[str], slices: list[np.ndarray], image: np.ndarray,
                  cancelled: threading.Event, extra: dict, key: str) -> Iterator[pb.DatasetStream]:
    """Stream per-slice results (K, Y, X) as one (K, Y, X) or (K, Z, Y, X) dataset."""
    layout = feature_layout(name, stack_shape(len(channels), image), dtype=dtype)
    volume = len(layout.shape) == 4
    blocks = ((block_origin(volume, z, 0), s[:, None] if volume else s) for z, s in enumerate(slices))
    attributes = {"axistags": axistags("czyx" if volume else "cyx"), "channel_names": channels,
                  "dinofeat_version": __version__, "source_sha256": image_sha256(image), **extra}
    yield from dataset_messages(layout, attributes, key, blocks, cancelled, name)
