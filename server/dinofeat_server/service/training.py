"""Training a classifier on the labelled pixels of a dataset's features, in one feature space."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
import numpy as np
from dinofeat.contract.images import image_sha256
from dinofeat.v1 import feature_service_pb2 as pb
from sklearn.base import ClassifierMixin

from ..engine.space import FeatureSpace
from ..segment.classifiers import DEFAULT_TREES, labelled_pixels, train_classifier
from ..segment.model_metadata import model_metadata
from .blocks import BlockPasses, WorkerFeatures


@dataclass(frozen=True)
class Training:
    """How a request trains its classifier: its kind, trees (0: DEFAULT_TREES) and seed, the server's limit on the
    size of its trees (max_training_gb) and the threads a forest trains and predicts on (-1: every core)."""

    kind: str
    trees: int = DEFAULT_TREES
    seed: int = 0
    max_training_gb: float = float("inf")
    threads: int = -1


Trained = tuple[ClassifierMixin, dict]
"""A trained classifier and its model file's metadata: what segment.model_file.TrainedModel holds, without
that module (segment predicts with them directly; train_work writes them as a model file)."""


def train_model(features: WorkerFeatures, images: list[np.ndarray], labels: list[np.ndarray], training: Training,
                passes: list[BlockPasses] | None = None,
                like: FeatureSpace | None = None) -> Generator[pb.Progress, None, Trained]:
    """Fit one space over all images (or take `like`), compute their features block by block and train a classifier
    on the labelled pixels. With `passes` given, the images' blocks go through them (to predict afterwards).
    Returns the classifier and its metadata."""
    space = yield from features.space(images, like)
    channels = features.channels(images[0])
    samples, classes = [], []
    for number, (image, label) in enumerate(zip(images, labels)):
        prefix = f"image {number + 1}/{len(images)}: " if len(images) > 1 else ""
        source = passes[number] if passes else BlockPasses(features, image, space, prefix)
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
    classifier = train_classifier(samples, classes, training.kind, training.trees, training.seed, threads=training.threads)
    yield pb.Progress(stage="training", done=1, total=1)
    return classifier, model_metadata(features.fset, features.computation, channels, space, classifier, training.kind,
                                      training.trees, training.seed, len(classes), [image_sha256(i) for i in images])
