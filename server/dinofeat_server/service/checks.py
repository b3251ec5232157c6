"""Request values checked before any work, each refused with one sentence (INVALID_ARGUMENT) instead of
failing deep in scikit-learn or torch (UNKNOWN with an internal message): every check the servicer makes is here."""

from __future__ import annotations

import json
import math

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from dinofeat.contract.computation import DEFAULT_SET, FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import image_channels, spatial_shape
from dinofeat.contract.wire import COMPRESSIONS, DEFAULT_CLASSIFIER, DEFAULT_LEVEL
from dinofeat.v1 import feature_service_pb2 as pb

from ..engine.space import FeatureSpace
from ..engine.stacks import CLASSICAL, FEATURE_SETS, FeatureSet
from ..engine.weights import check_backbone
from ..segment.classifiers import CLASSIFIERS
from .config import ServerLimits

if TYPE_CHECKING:
    from ..segment.model_file import TrainedModel

MAX_MODEL_BYTES = 512 << 20
"""Largest model file a client may upload."""
ANALYSES = ("kmeans", "pca", "foreground")
SEED_LIMIT = 1 << 32
"""Seeds are scikit-learn random states: integers in [0, 2**32)."""


def checked_seed(seed: int) -> int:
    """A seed for Segment, Train and Analyse (proto int64), refused outside [0, 2**32)."""
    if not 0 <= seed < SEED_LIMIT:
        raise DinofeatError(f"the seed must be between 0 and {SEED_LIMIT - 1}, not {seed}.")
    return int(seed)


def checked_computation(feature_set: str, options: pb.FeatureOptions, default_set: str = DEFAULT_SET) -> FeatureComputation:
    """A request's feature computation with defaults filled in; unknown sets, backbones, presets and options that do
    not apply to the set refused in one sentence."""
    computation = FeatureComputation.from_proto(feature_set, options, default_set).checked()
    check_backbone(computation.backbone)  # presets are checked by the description (tests/test_deep_sets: the engine's)
    return computation


def check_channels(fset: FeatureSet, options: FeatureComputation, images: list[np.ndarray], limit: int) -> None:
    """Refuse a result with more feature channels than the server allows (known before any work)."""
    for image in images:
        channels = len(fset.channel_names(image_channels(image), options))
        if channels > limit:
            raise DinofeatError(f"the {fset.name} set gives {channels} channels here, more than this server's limit of {limit}; "
                                "ask for fewer with --pca.")


def check_output_size(fset: FeatureSet, options: FeatureComputation, image: np.ndarray, limit_gb: float) -> None:
    """Refuse a feature result larger than the server allows (float32 samples), before any work."""
    channels = len(fset.channel_names(image_channels(image), options))
    size = channels * int(np.prod(spatial_shape(image))) * 4
    if size > limit_gb * (1 << 30):
        raise DinofeatError(f"the {fset.name} features of this image would take {size / (1 << 30):.1f} GiB, more than this "
                            f"server's limit of {limit_gb:g} GiB (max_output_gb); ask for fewer channels (--pca) or a smaller image.")


def checked_classifier(kind: str, trees: int) -> str:
    kind = kind or DEFAULT_CLASSIFIER
    if kind not in CLASSIFIERS:
        raise DinofeatError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}.")
    if not 0 <= trees <= 5000:
        raise DinofeatError(f"the forest needs between 1 and 5000 trees, not {trees}.")
    return kind


def checked_encoding(encoding: pb.Encoding) -> pb.Encoding:
    """Fill defaults (gzip level 1) and refuse unknown compressions or levels."""
    compression = encoding.compression or "gzip"
    level = encoding.level or DEFAULT_LEVEL
    if compression not in COMPRESSIONS:
        raise DinofeatError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}.")
    if not 1 <= level <= 9:
        raise DinofeatError(f"the gzip level must be between 1 and 9, not {level}.")
    return pb.Encoding(compression=compression, level=level)


def check_pairs(items: Sequence[str], partners: Sequence[str], sentence: str) -> None:
    """Refuse a request without items, or with another number of partners (label images, masks) than items."""
    if not items or len(items) != len(partners):
        raise DinofeatError(sentence)


def check_upload_size(size: int, limits: ServerLimits) -> None:
    """Refuse an image upload of `size` bytes beyond the server's max_upload_mb, at its header."""
    if size > limits.max_upload_bytes:
        raise DinofeatError(f"the image is {size / 2**20:.0f} MiB, more than this server's upload limit of "
                            f"{limits.max_upload_mb:.0f} MiB; send a smaller image or tile it.")


def check_model_size(size: int) -> None:
    """Refuse a model upload once it has grown past MAX_MODEL_BYTES."""
    if size > MAX_MODEL_BYTES:
        raise DinofeatError(f"the model file is larger than this server's limit of {MAX_MODEL_BYTES >> 20} MiB.")


def checked_model(model: TrainedModel | None, requested_set: str) -> TrainedModel:
    """An uploaded model to apply, refused when the server holds none or the request names another feature set."""
    if model is None:
        raise DinofeatError("the server holds no such model; upload it first.")
    trained_on = model.metadata["feature_set"]
    if requested_set and requested_set != trained_on:
        raise DinofeatError(f"the model was trained on {trained_on!r} features, not {requested_set!r}; "
                            f"apply it with --set {trained_on} or train a new one.")
    return model


def check_analysis(analysis: str, clusters: int) -> None:
    """Refuse an unknown analysis, or k-means with fewer than 2 or more than 256 clusters."""
    if analysis not in ANALYSES:
        raise DinofeatError(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}.")
    if analysis == "kmeans" and not 2 <= clusters <= 256:
        raise DinofeatError(f"k-means needs between 2 and 256 clusters, not {clusters}.")


def check_grid(grid: int, window: int, images: list[np.ndarray]) -> None:
    """Refuse a few-shot grid and window that a support image is too small for.

    Each support plane (Y, X) is pooled to ceil(Y / grid) x ceil(X / grid) cells of `grid` pixels, and
    its prototypes are pooled over windows of `window` x `window` cells: a side with fewer cells than
    the window leaves no window at all (torch: "Output size is too small"). The query has no such
    limit: it is only pooled to the grid. `images` are the support images (2-D, RGB or stacks)."""
    if not (1 <= window <= 64 and 1 <= grid <= 64):
        raise DinofeatError("the pooling window and the grid cell must be between 1 and 64.")
    for number, image in enumerate(images, start=1):
        height, width = spatial_shape(image)[-2:]
        cells = (math.ceil(height / grid), math.ceil(width / grid))
        if min(cells) < window:
            which = f"support image {number}" if len(images) > 1 else "the support image"
            raise DinofeatError(f"{which} ({height} x {width} pixels) gives only {cells[0]} x {cells[1]} grid cells of "
                                f"{grid} pixels, fewer than the pooling window of {window} x {window} cells; give a smaller --grid or "
                                f"--window, or a support image of more than {(window - 1) * grid} pixels on each side.")


def label_classes(labels: list[np.ndarray]) -> int:
    """Distinct non-zero values over label images (8- and 16-bit counted in one pass, without sorting)."""
    present = np.zeros(1 << 16, bool)
    others: set[int] = set()
    for label in labels:
        if label.dtype in (np.uint8, np.uint16):
            present[: 1 << (8 * label.dtype.itemsize)] |= np.bincount(label.ravel(), minlength=1 << (8 * label.dtype.itemsize)) > 0
        else:
            others.update(int(v) for v in np.unique(label))
    others.update(int(v) for v in np.flatnonzero(present))
    return len(others - {0})


def check_classes(labels: list[np.ndarray], limits: ServerLimits, image: np.ndarray | None = None) -> None:
    """Refuse labels of more classes than max_channels (each class is a probability channel and a float64 in
    every tree node) and, with the `image` they predict, probabilities beyond max_output_gb; before any work."""
    check_probabilities(label_classes(labels), image, limits)


def check_probabilities(classes: int, image: np.ndarray | None, limits: ServerLimits) -> None:
    """Refuse `classes` classes beyond max_channels, or their float32 probabilities of every pixel of `image`
    (when given) beyond max_output_gb."""
    if classes > limits.max_channels:
        raise DinofeatError(f"{classes} classes would give {classes} probability channels, more than this server's limit of "
                            f"{limits.max_channels} (max_channels); label fewer classes.")
    size = classes * int(np.prod(spatial_shape(image))) * 4 if image is not None else 0
    if size > limits.max_output_gb * (1 << 30):
        raise DinofeatError(f"the probabilities of {classes} classes for this image would take {size / (1 << 30):.1f} GiB, more "
                            f"than this server's limit of {limits.max_output_gb:g} GiB (max_output_gb); use fewer classes or a "
                            "smaller image.")


LIKE_ADVICE = "pass --like a feature file or model from this dinofeat."
MAX_SPACE_ITEMS = 10_000
"""Most JSON values (counted by their separators) a feature space may have. A space from dinofeat has a few
dozen, its arrays being base64 strings; parsing a million numbers holds the interpreter for half a second,
whichever thread does it, so such a text is refused before it is parsed."""


def requested_space(text: str) -> FeatureSpace | None:
    """The feature space a request names (--like), or None to fit one; anything that is not a space this
    dinofeat wrote (too many values, bad or too deeply nested JSON, arrays whose shapes disagree) is refused
    in one sentence. Decoding megabytes of base64 takes a while: call it off the event loop."""
    if not text:
        return None
    items = sum(text.count(separator) for separator in ",:[{")
    if items > MAX_SPACE_ITEMS:
        raise DinofeatError(f"the requested feature space has about {items} JSON values, where a space from dinofeat has a few "
                            f"dozen; {LIKE_ADVICE}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise DinofeatError(f"the requested feature space is not valid JSON, or is nested too deeply; {LIKE_ADVICE}") from None
    if not isinstance(value, dict):
        raise DinofeatError(f"the requested feature space is not a JSON object; {LIKE_ADVICE}")
    space = FeatureSpace.from_dict(value)
    problem = space_shape_problem(space)
    if problem:
        raise DinofeatError(f"the requested feature space is damaged: {problem}; {LIKE_ADVICE}")
    return space


def space_shape_problem(space: FeatureSpace) -> str | None:
    """What disagrees between a space's arrays and its identity, or None: mean (C,) with components (k, C),
    k at most the PCA size its set names, shift and scale of one length (the channels its identity implies where
    that is known without a model: known_channels), a finite input range."""
    spec = space.identity.get("feature_set")
    pca = spec.get("pca", 0) if isinstance(spec, dict) else 0
    if not all(math.isfinite(bound) for bound in space.input_range):
        return "its input range is not finite"
    if (space.mean is None) != (space.components is None) or (space.shift is None) != (space.scale is None):
        return "it has a mean without components or a shift without a scale, or the reverse"
    if space.components is not None:
        if space.components.ndim != 2 or space.mean.shape != space.components.shape[1:]:
            return f"its PCA components {space.components.shape} do not fit its mean {space.mean.shape}"
        if not isinstance(pca, int) or not 1 <= space.components.shape[0] <= pca:  # fewer where the model has fewer channels
            return f"it has {space.components.shape[0]} PCA components where its feature set names {pca}"
    elif pca:
        return f"its feature set names {pca} PCA components but it holds none"
    if space.shift is not None:
        if space.shift.ndim != 1 or space.shift.shape != space.scale.shape:
            return f"its channel shift {space.shift.shape} and scale {space.scale.shape} differ in shape"
        channels = known_channels(space.identity, 0 if space.components is None else len(space.components))
        if channels is not None and len(space.shift) != channels:
            return f"it scales {len(space.shift)} channels where its features have {channels}"
    return None


def known_channels(identity: dict, components: int) -> int | None:
    """The output channels a space's identity implies where no model is needed to know them: every channel of a
    filter bank, or a deep set's `components` (beside the classical bank for the hybrid); None for a deep set
    without PCA, whose channels are its model's, or an identity no request has (refused when compared)."""
    spec, image_channels = identity.get("feature_set"), identity.get("image_channels")
    fset = FEATURE_SETS.get(spec.get("name")) if isinstance(spec, dict) and isinstance(spec.get("name"), str) else None
    if fset is None or image_channels not in (1, 3):
        return None
    if not fset.deep:
        return len(fset.channel_names(image_channels))
    if not components:
        return None
    return components + (len(CLASSICAL.channel_names(image_channels)) if fset.with_classical else 0)
