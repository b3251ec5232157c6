"""The work behind each streaming call: engine and classifier in, DatasetStream messages out.

Plain generators that run in a worker thread (see streaming.messages_from_thread); nothing here
knows about gRPC beyond the message types.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch

from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client import __version__
from dinofeat_client.images import image_axes, image_sha256
from dinofeat_client.wire import axistags, feature_layout, features_result_key, segment_result_key

from ..engine.stacks import FeatureOptions, FeatureSet, Models, intensity_scaled
from ..segment.forest import DEFAULT_TREES, class_probabilities, labelled_pixels, train_forest
from .streaming import Cancelled, dataset_messages, progress_message


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
    axes = image_axes(image)
    spatial = [image.shape[axes.index(a)] for a in axes if a != "c"]
    return (channels, *spatial)


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
                 wanted: set[int] | None, device: torch.device, cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
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
    yield from dataset_messages(layout, attributes, key, blocks(), wanted, cancelled, "features")


def segment_work(image: np.ndarray, labels: np.ndarray, fset: FeatureSet, options: FeatureOptions, models: Models,
                 trees: int, seed: int, encoding: pb.Encoding, device: torch.device,
                 cancelled: threading.Event) -> Iterator[pb.DatasetStream]:
    """Compute features, train a forest on the labelled pixels, stream the class probabilities."""
    slices = slices_of(image)
    label_slices = list(labels) if labels.ndim == 3 else [labels]
    check = cancel_check(cancelled)
    stacks = []
    for z, plane in enumerate(slices):
        check()
        stacks.append(np.concatenate([b for _, b in fset.strips(intensity_scaled(plane), device, options, models, check)], axis=1))
        yield progress_message("features", z + 1, len(slices))
    samples, classes = zip(*(labelled_pixels(f, l) for f, l in zip(stacks, label_slices)))
    yield progress_message("training", 0, 1)
    forest = train_forest(np.concatenate(samples), np.concatenate(classes), trees or DEFAULT_TREES, seed)
    yield progress_message("training", 1, 1)
    values = [int(v) for v in forest.classes_]
    layout = feature_layout("probabilities", stack_shape(len(values), image), encoding.compression, encoding.level)
    volume = len(layout.shape) == 4
    rows = layout.chunk_shape[-2]

    def blocks():
        for z, stack in enumerate(stacks):
            for y0 in range(0, stack.shape[1], rows):
                block = class_probabilities(forest, stack[:, y0 : y0 + rows])
                yield block_origin(volume, z, y0), block[:, None] if volume else block

    attributes = {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": [f"class_{v}" for v in values],
        "class_values": values,
        "feature_set": fset.spec(options),
        "classifier": {"kind": "random_forest", "trees": trees or DEFAULT_TREES, "class_weight": "balanced", "seed": seed},
        "labelled_pixels": int(sum(len(c) for c in classes)),
        "dinofeat_version": __version__,
        "source_sha256": image_sha256(image),
        "labels_sha256": image_sha256(labels),
    }
    key = segment_result_key(attributes["source_sha256"], attributes["labels_sha256"], fset.name,
                             options.key(), trees, seed)
    yield from dataset_messages(layout, attributes, key, blocks(), None, cancelled, "probabilities")
