"""The work behind each streaming call: engine and classifier in, DatasetStream messages out.

Plain generators that run in a worker thread (see streaming.messages_from_thread); nothing here
knows about gRPC beyond the message types.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client import __version__
from dinofeat_client.images import image_axes, image_sha256, spatial_shape
from dinofeat_client.wire import (
    MAX_MESSAGE_BYTES,
    apply_result_key,
    axistags,
    feature_layout,
    features_result_key,
    result_key,
    segment_result_key,
)

from ..engine.stacks import (
    FeatureOptions,
    FeatureSet,
    Models,
    feature_set,
    intensity_scaled,
)
from ..segment.classifiers import (
    DEFAULT_TREES,
    class_probabilities,
    class_values,
    labelled_pixels,
    train_classifier,
)
from ..segment.fewshot import (
    Shot,
    segment_query,
    standardise_by_support,
    to_grid,
    volume_support_slices,
)
from ..segment.model_file import TrainedModel, model_bytes
from ..segment.unsupervised import attention_foreground, kmeans_labels, pca_picture
from .result_cache import ResultCache
from .streaming import Cancelled, dataset_messages, only_chunks, progress_message


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


def block_origin(volume: bool, z: int, y0: int) -> tuple[int, ...]:
    return (0, z, y0, 0) if volume else (0, y0, 0)


def feature_attributes(image: np.ndarray, image_sha: str, fset: FeatureSet, options: FeatureOptions,
                       models: Models, names: list[str]) -> dict:
    volume = image_axes(image).startswith("z")
    return {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": names,
        "feature_set": fset.spec(options),
        "backbone": options.backbone if fset.deep else "",
        "weights_sha256": models.weights_sha256(options.backbone) if fset.deep else "",
        "dinofeat_version": __version__,
        "source_sha256": image_sha,
        "source_shape": list(image.shape),
        "source_dtype": image.dtype.name,
    }


def feature_work(image: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models, encoding: pb.Encoding,
                 device: torch.device, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Compute `fset` over every slice and stream it as the dataset "features"."""
    image_sha = image_sha256(image)
    slices = slices_of(image)
    channels = 3 if image_axes(image).endswith("c") else 1
    yield progress_message("loading", 0, 1)
    names = fset.channel_names(channels, options, models)  # loads the model of a deep set
    yield progress_message("loading", 1, 1)
    layout = feature_layout("features", stack_shape(len(names), image), encoding.compression, encoding.level)
    key = features_result_key(image_sha, fset.name, options.key(), layout.compression, layout.level)
    volume = len(layout.shape) == 4
    check = cancel_check(cancelled)

    def blocks():
        for z, plane in enumerate(slices):
            for y0, block in fset.strips(intensity_scaled(plane), device, options, models, check):
                yield block_origin(volume, z, y0), block[:, None] if volume else block

    attributes = feature_attributes(image, image_sha, fset, options, models, names)
    yield from dataset_messages(layout, attributes, key, blocks(), cancelled, "features")


def feature_stream(cache: ResultCache | None, image: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models,
                   encoding: pb.Encoding, wanted: set[int] | None, device: torch.device,
                   cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """feature_work through the result cache (keyed by image, set, options, encoding and the weights'
    checksum), keeping only the chunks a resuming client asked for."""
    def compute() -> Iterator[pb.DatasetStream]:
        return feature_work(image, fset, options, models, encoding, device, cancelled)

    if cache is None:
        yield from only_chunks(compute(), wanted)
        return
    weights = models.weights_sha256(options.backbone) if fset.deep else ""
    key = result_key(features_result_key(image_sha256(image), fset.name, options.key(), encoding.compression, encoding.level), weights)
    yield from only_chunks(cache.stream(key, compute), wanted)


def slice_features(image: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models,
                   device: torch.device, check, stage: str = "features") -> Iterator[pb.Progress | np.ndarray]:
    """Progress messages, then the (C, Y, X) feature stack of each slice of `image`, in order."""
    slices = slices_of(image)
    for z, plane in enumerate(slices):
        check()
        yield np.concatenate([b for _, b in fset.strips(intensity_scaled(plane), device, options, models, check)], axis=1)
        yield pb.Progress(stage=stage, done=z + 1, total=len(slices))


def split_progress(items: Iterator[pb.Progress | np.ndarray], results: list) -> Iterator[pb.Progress]:
    """Pass progress messages on; collect everything else into `results`."""
    for item in items:
        if isinstance(item, pb.Progress):
            yield item
        else:
            results.append(item)


def train_model(images: list[np.ndarray], labels: list[np.ndarray], fset: FeatureSet, options: FeatureOptions, models: Models,
                kind: str, trees: int, seed: int, device: torch.device, check, trained: list,
                stacks: list | None = None) -> Iterator[pb.Progress]:
    """Compute features, train a classifier on the labelled pixels; append the TrainedModel to `trained`.

    The feature stacks of every slice are appended to `stacks` when given (to predict without recomputing)."""
    samples, classes, channels = [], [], 0
    for number, (image, label) in enumerate(zip(images, labels)):
        slices: list[np.ndarray] = []
        yield from split_progress(slice_features(image, fset, options, models, device, check, f"features {number + 1}/{len(images)}"), slices)
        for features, label_slice in zip(slices, list(label) if label.ndim == 3 else [label]):
            s, c = labelled_pixels(features, label_slice)
            samples.append(s)
            classes.append(c)
            channels = features.shape[0]
        if stacks is not None:
            stacks.extend(slices)
    yield pb.Progress(stage="training", done=0, total=1)
    samples, classes = np.concatenate(samples), np.concatenate(classes)
    classifier = train_classifier(samples, classes, kind, trees, seed)
    yield pb.Progress(stage="training", done=1, total=1)
    trained.append(TrainedModel(classifier, {
        "feature_set": fset.name, "options": asdict(options), "feature_spec": fset.spec(options), "channels": channels,
        "class_values": class_values(classifier), "classifier": {"kind": kind, "trees": trees or DEFAULT_TREES, "seed": seed,
                                                                  "class_weight": "balanced"},
        "labelled_pixels": int(len(classes)), "training_images": [image_sha256(i) for i in images],
        "dinofeat_version": __version__,
    }))


def probability_messages(model: TrainedModel, image: np.ndarray, stacks: list[np.ndarray], encoding: pb.Encoding,
                         key: str, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Stream the per-class probabilities of every slice as the dataset "probabilities"."""
    values = model.metadata["class_values"]
    layout = feature_layout("probabilities", stack_shape(len(values), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4
    rows = layout.chunk_shape[-2]

    def blocks():
        for z, stack in enumerate(stacks):
            for y0 in range(0, stack.shape[1], rows):
                block = class_probabilities(model.classifier, stack[:, y0 : y0 + rows])
                yield block_origin(volume, z, y0), block[:, None] if volume else block

    attributes = {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": [f"class_{v}" for v in values],
        "class_values": values,
        "feature_set": model.metadata["feature_spec"],
        "classifier": model.metadata["classifier"],
        "labelled_pixels": model.metadata["labelled_pixels"],
        "dinofeat_version": __version__,
        "source_sha256": image_sha256(image),
    }
    yield from dataset_messages(layout, attributes, key, blocks(), cancelled, "probabilities")


def as_stream(progress: Iterator[pb.Progress]) -> Iterator[pb.DatasetStream]:
    for message in progress:
        yield pb.DatasetStream(progress=message)


def segment_work(image: np.ndarray, labels: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models,
                 kind: str, trees: int, seed: int, encoding: pb.Encoding, device: torch.device,
                 cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Train on the image's own labels and stream its class probabilities (features computed once)."""
    trained, stacks = [], []
    yield from as_stream(train_model([image], [labels], fset, options, models, kind, trees, seed, device,
                                     cancel_check(cancelled), trained, stacks))
    key = segment_result_key(image_sha256(image), image_sha256(labels), fset.name, options.key(), kind, trees, seed)
    yield from probability_messages(trained[0], image, stacks, encoding, key, cancelled)


def train_work(images: list[np.ndarray], labels: list[np.ndarray], fset: FeatureSet, options: FeatureOptions, models: Models,
               kind: str, trees: int, seed: int, device: torch.device, cancelled: threading.Event) -> Iterator[pb.TrainReply]:
    """Train on several images and stream the model file back in pieces, then its summary."""
    trained: list[TrainedModel] = []
    for message in train_model(images, labels, fset, options, models, kind, trees, seed, device, cancel_check(cancelled), trained):
        yield pb.TrainReply(progress=message)
    data = model_bytes(trained[0])
    for start in range(0, len(data), MAX_MESSAGE_BYTES):
        yield pb.TrainReply(model_piece=data[start : start + MAX_MESSAGE_BYTES])
    meta = trained[0].metadata
    yield pb.TrainReply(summary=pb.ModelSummary(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), class_values=meta["class_values"],
                                                labelled_pixels=meta["labelled_pixels"], classifier=meta["classifier"]["kind"]))


def apply_work(model: TrainedModel, model_sha: str, image: np.ndarray, fset: FeatureSet, models: Models, encoding: pb.Encoding,
               device: torch.device, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Compute the model's feature set on a new image and stream its class probabilities."""
    options = FeatureOptions(**model.metadata["options"])
    channels = 3 if image_axes(image).endswith("c") else 1
    model.check_features(fset.name, len(fset.channel_names(channels, options, models)))
    stacks: list[np.ndarray] = []
    yield from as_stream(split_progress(slice_features(image, fset, options, models, device, cancel_check(cancelled)), stacks))
    key = apply_result_key(model_sha, image_sha256(image))
    yield from probability_messages(model, image, stacks, encoding, key, cancelled)


def analyse_work(image: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models, analysis: str, clusters: int,
                 seed: int, device: torch.device, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """k-means labels, a PCA picture or an attention foreground mask of every slice, as one dataset."""
    if analysis == "foreground":
        fset = attention_set()
    stacks: list[np.ndarray] = []
    yield from as_stream(split_progress(slice_features(image, fset, options, models, device, cancel_check(cancelled)), stacks))
    results = []
    for stack in stacks:
        features = torch.from_numpy(stack)
        if analysis == "kmeans":
            results.append(kmeans_labels(features, clusters, seed)[None])
        elif analysis == "pca":
            results.append(np.moveaxis(pca_picture(features), -1, 0))
        else:
            results.append(attention_foreground(features)[None].astype(np.uint8))
    name, dtype, channels = {"kmeans": ("labels", "uint16", ["cluster"]), "pca": ("picture", "uint8", ["pc1", "pc2", "pc3"]),
                             "foreground": ("mask", "uint8", ["foreground"])}[analysis]
    yield from whole_dataset(name, dtype, channels, results, image, cancelled,
                             {"analysis": analysis, "clusters": clusters, "seed": seed, "feature_set": fset.spec(options)},
                             result_key(analysis, image_sha256(image), fset.name, options.key(), clusters, seed))


def fewshot_work(supports: list[np.ndarray], masks: list[np.ndarray], query: np.ndarray, fset: FeatureSet, options: FeatureOptions,
                 models: Models, window: int, grid: int, all_components: bool, device: torch.device,
                 cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Few-shot segmentation of every slice of the query: dataset "fewshot" with channels [mask, foreground_probability].

    A stack as the single support follows the volume protocol (three sections, middle slices)."""
    check = cancel_check(cancelled)
    support_stacks: list[np.ndarray] = []
    for image in supports:
        yield from as_stream(split_progress(slice_features(image, fset, options, models, device, check, "support features"), support_stacks))
    support_masks = [m for mask in masks for m in (list(mask) if mask.ndim == 3 else [mask])]
    query_stacks: list[np.ndarray] = []
    yield from as_stream(split_progress(slice_features(query, fset, options, models, device, check, "query features"), query_stacks))
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
        probability, mask = segment_query(cells, slice_shots, tuple(features.shape[-2:]), window, not all_components)
        results.append(np.stack([mask.astype(np.float32), probability]))
        yield pb.DatasetStream(progress=pb.Progress(stage="segmenting", done=z + 1, total=len(query_tensors)))
    yield from whole_dataset("fewshot", "float32", ["mask", "foreground_probability"], results, query, cancelled,
                             {"window": window, "grid": grid, "all_components": all_components, "shots": len(shots),
                              "feature_set": fset.spec(options)},
                             result_key("fewshot", image_sha256(query), [image_sha256(s) for s in supports],
                                        [image_sha256(m) for m in masks], fset.name, options.key(), window, grid, all_components))


def whole_dataset(name: str, dtype: str, channels: list[str], slices: list[np.ndarray], image: np.ndarray,
                  cancelled: threading.Event, extra: dict, key: str) -> Iterator[pb.DatasetStream]:
    """Stream per-slice results (K, Y, X) as one (K, Y, X) or (K, Z, Y, X) dataset."""
    layout = feature_layout(name, stack_shape(len(channels), image), dtype=dtype)
    volume = len(layout.shape) == 4
    blocks = ((block_origin(volume, z, 0), s[:, None] if volume else s) for z, s in enumerate(slices))
    attributes = {"axistags": axistags("czyx" if volume else "cyx"), "channel_names": channels,
                  "dinofeat_version": __version__, "source_sha256": image_sha256(image), **extra}
    yield from dataset_messages(layout, attributes, key, blocks, cancelled, name)
