"""A trained model over a volume as Dask tasks (or in this process): train on its labelled slices, apply to every slice.

Apply (`classify_to_zarr`): the client reads the model file once and checks it; one task (on a worker, which has
the data and the backbone) checks the model against the volume's features and takes the model's own feature space
(`fit_volume(..., like=model.space())`, as the server's `jobs.apply_work` does); the fitted volume and the model
file's bytes are sent to every worker once (`scatter(broadcast=True)`), and each worker process loads the model once,
keyed by its sha256 (`loaded_model`, as `worker_models` keeps the backbone). Then one task per slice computes the
slice's features block by block, the classifier's per-class probabilities of each block (`class_probabilities`, the
server's function) and the most probable class in the model's class values, and writes only its own slice's chunks:
the label image's full resolution, then each level of its pyramid (mode of 2 x 2 blocks, `zarr_io.halved`), and the
probabilities when asked for. So the class map equals `dinofeat apply MODEL STACK -o OUT.tif` on the same stack.

Segment (`segment_to_zarr`): the space is fitted over every slice (as `dinofeat segment` fits it over the stack);
one task per slice reads that slice's labels and, only when it carries some, computes its features and returns the
labelled pixels' feature vectors (`classifiers.labelled_pixels`): only those travel to the client, which trains the
classifier in slice and block order (the order of `training.train_model`, so the same seed grows the same forest), then
applies it as above.

Outputs: the label image `OUT.zarr` (`zarr_io.create_label_store`: NGFF 0.4 "multiscales" and "image-label") and,
on request, the probabilities `OUT.probabilities.zarr` (float32 (K, Z, Y, X), one channel per class in ascending
value, the HDF5 output's dataset), each built under a hidden name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dinofeat.contract.computation import FeatureComputation
from dinofeat import __version__
from dinofeat.contract.errors import DinofeatError

from ..engine.stacks import feature_set
from ..segment.classifiers import (
    DEFAULT_CLASSIFIER,
    class_probabilities,
    labelled_pixels,
    train_classifier,
    with_threads,
)
from ..segment.model_file import TrainedModel, model_bytes, model_from_bytes
from ..segment.model_metadata import model_metadata
from .dask_run import Progress, check_workers, each_slice, fitted_on, request_for
from .sources import VolumeSource, absolute_name, open_volume
from .tasks import FeatureRequest, FittedVolume, fit_volume, located, slice_blocks
from .zarr_io import (
    checked_output,
    create_feature_store,
    create_label_store,
    finish_store,
    is_feature_store,
    label_dtype,
    open_level,
    parent_image,
    partial_path,
    write_block,
    write_labels,
)

PROBABILITIES_SUFFIX = ".probabilities.zarr"


@dataclass(frozen=True)
class ModelFile:
    """A model file's bytes and their sha256: sent to every worker once, loaded once per worker process."""

    sha256: str
    data: bytes = field(repr=False)

    @classmethod
    def of(cls, data: bytes) -> ModelFile:
        return cls(hashlib.sha256(data).hexdigest(), data)


_models: dict[str, TrainedModel] = {}
_lock = threading.Lock()


def loaded_model(model: ModelFile) -> TrainedModel:
    """The model of this process for `model.sha256`, read from its bytes on first use (a worker keeps it for later tasks)."""
    with _lock:
        if model.sha256 not in _models:
            _models[model.sha256] = model_from_bytes(model.data)
        return _models[model.sha256]


def read_model(path: str | os.PathLike) -> tuple[ModelFile, TrainedModel]:
    """A model file read and checked here, before any worker sees it; one sentence when it is not a dinofeat model."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DinofeatError(f"cannot read the model file {path} ({error.strerror or error}).") from None
    try:
        trained = model_from_bytes(data)
    except DinofeatError as error:
        raise DinofeatError(f"{path}: {error}") from None
    return ModelFile.of(data), trained


@dataclass(frozen=True)
class Classification:
    """What every slice task of an apply receives (sent once): the volume in the model's space, the model, the outputs."""

    fitted: FittedVolume
    model: ModelFile
    levels: int = 0
    """Downsampled levels of the label image's pyramid (0: full resolution only)."""
    dtype: str = "uint8"
    """The label image's type: the smallest that holds the class values."""


def fit_for_model(request: FeatureRequest, model: ModelFile) -> FittedVolume:
    """The volume in the model's own space, after checking that the model takes these features (as the server's apply)."""
    trained = loaded_model(model)
    fset = feature_set(request.feature_set)
    try:
        trained.check_features(fset.name, len(fset.channel_names(request.source.channels, request.computation, request.models())))
    except DinofeatError as error:
        raise located(error) from None
    return fit_volume(request, trained.space())


def classify_slice(z: int, run: Classification, labels: str, probabilities: str = "") -> int:
    """Classify slice z and write its class map (every pyramid level) into the store `labels`, and its per-class
    probabilities into `probabilities` when named: only this slice's chunks. Returns z."""
    trained = loaded_model(run.model)
    classifier = with_threads(trained.classifier, torch.get_num_threads())  # a Dask worker's threads, not the trainer's
    values = np.asarray(trained.metadata["class_values"]).astype(run.dtype)
    source = run.fitted.request.source
    volume = source.volume
    class_map = np.empty(source.shape[1:3], run.dtype)
    stored = open_level(Path(probabilities)) if probabilities else None
    with torch.inference_mode():
        for y0, x0, block in slice_blocks(run.fitted, z):
            probability = class_probabilities(classifier, block)
            class_map[y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = values[np.argmax(probability, axis=0)]
            if stored is not None:
                write_block(stored, z if volume else None, y0, x0, probability)
    write_labels(Path(labels), z if volume else None, class_map, run.levels)
    return z


def probabilities_path(output: Path, probabilities: str | os.PathLike | bool | None) -> Path | None:
    """Where the probabilities go: None, the store named, or (True) OUT.probabilities.zarr beside the label image."""
    if not probabilities:
        return None
    return output.with_name(output.name[: -len(".zarr")] + PROBABILITIES_SUFFIX) if probabilities is True else Path(probabilities)


def classify_volume(client, fitted: FittedVolume, model: ModelFile, trained: TrainedModel, output: Path,
                    probabilities: Path | None, levels: int, report: Progress) -> tuple[Path, Path | None]:
    """Write the label image (and the probabilities) of a fitted volume, one task per slice; the finished stores."""
    values = [int(v) for v in trained.metadata["class_values"]]
    source = fitted.request.source
    attributes = {"class_values": values, "classifier": trained.metadata.get("classifier", {}),
                  "feature_set": trained.metadata.get("feature_spec", trained.metadata["feature_set"]),
                  "computation": fitted.attributes.get("computation", {}), "model_sha256": model.sha256, "feature_space": fitted.space.to_dict(), "dinofeat_version": __version__,
                  "source": source.path, "source_shape": list(source.shape if source.volume else source.shape[1:])}
    run = Classification(fitted, model, levels, label_dtype(values))
    labels_partial = partial_path(output)
    create_label_store(labels_partial, source.spatial_shape, run.dtype, values, levels, {**attributes, "kind": "labels"},
                       parent_image(source.kind, source.path, source.dataset, output))
    stores = {"labels": str(labels_partial)}
    if probabilities is not None:
        partial = partial_path(probabilities)
        create_feature_store(partial, (len(values), *source.spatial_shape), [f"class_{v}" for v in values],
                             {**attributes, "kind": "probabilities", "channel_names": [f"class_{v}" for v in values]},
                             name="probabilities")
        stores["probabilities"] = str(partial)
    each_slice(client, classify_slice, run, source.planes, report, **stores)
    written = finish_store(Path(stores["probabilities"]), probabilities) if probabilities is not None else None
    if probabilities is None:
        remove_earlier_probabilities(output)
    return finish_store(labels_partial, output), written


def remove_earlier_probabilities(output: Path) -> None:
    """Remove the OUT.probabilities.zarr an earlier run wrote beside the label image `output` when this run writes no
    probabilities: they would no longer belong to the labels beside them."""
    earlier = probabilities_path(output, True)
    if earlier.is_dir() and is_feature_store(earlier):
        shutil.rmtree(earlier)


def checked_outputs(output: str | os.PathLike, probabilities: str | os.PathLike | bool | None, overwrite: bool,
                    levels: int) -> tuple[Path, Path | None]:
    """The label image's and the probabilities' stores, both refused (before any work) as `checked_output` does, and
    the pyramid's levels checked."""
    if not 0 <= levels <= 8:
        raise DinofeatError(f"--pyramid takes 0 to 8 downsampled levels, not {levels}.")
    output = checked_output(output, overwrite)
    wanted = probabilities_path(output, probabilities)
    return output, checked_output(wanted, overwrite) if wanted is not None else None


def classify_to_zarr(volume: str | os.PathLike | VolumeSource, model: str | os.PathLike, output: str | os.PathLike, *,
                     probabilities: str | os.PathLike | bool | None = None, levels: int = 0, feature_set: str = "",
                     device: str = "auto", weights: dict[str, str] | None = None, client=None, overwrite: bool = False,
                     progress: Progress | None = None) -> tuple[Path, Path | None]:
    """Apply a model file (`dinofeat train`) to every slice of a volume into an OME-Zarr label image.

    Parameters
    ----------
    volume : path or VolumeSource
        A TIFF stack, OME-Zarr or HDF5 volume (or 2-D image) every worker reads under this path.
    model : path
        The model file (.dfm), read here and sent to each worker once.
    output : path
        The label image to write, named .zarr: class values (Z, Y, X) in the smallest integer type that holds them.
    probabilities : path or True, optional
        Also write the float32 per-class probabilities (K, Z, Y, X) to this .zarr (True: OUT.probabilities.zarr).
    levels : int, optional
        Downsampled levels of the label image (each half the last in Y and X, by the mode of 2 x 2 blocks).
    feature_set : str, optional
        When given, the feature set the model must use.
    device, weights, client, overwrite, progress
        As for `dask_run.features_to_zarr`; `weights` maps "*" (or the backbone) to the deep model's weights file.

    Returns
    -------
    (Path, Path or None)
        The complete label image and probabilities stores.
    """
    output, wanted = checked_outputs(output, probabilities, overwrite, levels)
    model_file, trained = read_model(model)
    computation = trained.computation()
    if feature_set and feature_set != computation.feature_set:
        raise DinofeatError(f"the model was trained on the {computation.feature_set} set, not {feature_set}; leave --set out "
                            "(a model carries its features) or train a new one.")
    request = request_for(volume, computation, device, weights)
    if client is not None:
        check_workers(client, request)
    report = progress or (lambda stage, done, total: None)
    fitted = fitted_on(client, fit_for_model, request, model_file, report=report)
    return classify_volume(client, fitted, model_file, trained, output, wanted, levels, report)


def labelled_samples(z: int, fitted: FittedVolume, labels: VolumeSource) -> tuple[np.ndarray, np.ndarray] | None:
    """(feature vectors (N, C), class values (N,)) of slice z's labelled pixels in block order; None (and no features
    computed) when the slice carries no labels."""
    label = labels.plane(z)
    if not label.any():
        return None
    samples, classes = [], []
    with torch.inference_mode():
        for y0, x0, block in slice_blocks(fitted, z):
            s, c = labelled_pixels(block, label[y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]])
            samples.append(s)
            classes.append(c)
    return np.concatenate(samples), np.concatenate(classes)


def checked_labels(labels: str | os.PathLike | np.ndarray, source: VolumeSource) -> VolumeSource:
    """The labels as a volume of the image's planes, integer class values; one sentence otherwise."""
    found = open_volume(labels if isinstance(labels, np.ndarray) else absolute_name(labels))
    if found.shape != source.shape[:3] or found.volume != source.volume:
        raise DinofeatError(f"the labels have shape {found.shape if found.volume else found.shape[1:]} but the image has "
                            f"{source.spatial_shape}; they must match pixel for pixel.")
    if not np.issubdtype(np.dtype(found.dtype), np.integer):
        raise DinofeatError(f"the labels have samples of type {found.dtype}; use 8- or 16-bit integer class values.")
    return found


def gathered_samples(client, fitted: FittedVolume, labels: VolumeSource, report: Progress) -> tuple[np.ndarray, np.ndarray]:
    """The labelled pixels of every slice (one task each; unlabelled slices compute nothing), in slice order."""
    parts = each_slice(client, labelled_samples, fitted, labels.planes, report, "labelled slices", labels=labels)
    found = [part for part in parts if part is not None]
    if not found:
        raise DinofeatError("the labels hold no labelled pixels; label at least two classes.")
    return np.concatenate([s for s, _ in found]), np.concatenate([c for _, c in found])


def trained_on_volume(client, fitted: FittedVolume, labels: VolumeSource, kind: str, trees: int, seed: int,
                      report: Progress) -> TrainedModel:
    """A classifier trained on the volume's labelled pixels in its fitted space, with a model file's metadata."""
    samples, classes = gathered_samples(client, fitted, labels, report)
    report("training", 0, 1)
    classifier = train_classifier(samples, classes, kind, trees, seed)
    report("training", 1, 1)
    request = fitted.request
    return TrainedModel(classifier, model_metadata(feature_set(request.feature_set), request.computation, len(fitted.channel_names),
                                                   fitted.space, classifier, kind, trees, seed, len(classes), [request.source.path]))


def train_volume(volume, labels, computation: FeatureComputation = FeatureComputation(), *,
                 kind: str = DEFAULT_CLASSIFIER, trees: int = 0, seed: int = 0, device: str = "auto",
                 weights: dict[str, str] | None = None, client=None,
                 progress: Progress | None = None) -> tuple[FittedVolume, TrainedModel]:
    """Fit the volume's space over all its slices and train a classifier on its labelled slices: (the fitted volume,
    the model). Parameters as `segment_to_zarr`."""
    request = request_for(volume, computation, device, weights)
    label_source = checked_labels(labels, request.source)
    if client is not None:
        check_workers(client, request)
        check_workers(client, FeatureRequest(label_source))
    report = progress or (lambda stage, done, total: None)
    fitted = fitted_on(client, fit_volume, request, None, report=report)
    return fitted, trained_on_volume(client, fitted, label_source, kind, trees, seed, report)


def save_model(trained: TrainedModel, path: str | os.PathLike | None = None) -> ModelFile:
    """The model file of a trained model, written to `path` (under a temporary name, then renamed) when given."""
    from dinofeat.contract.outputs import atomic_write

    model = ModelFile.of(model_bytes(trained))
    if path is not None:
        atomic_write(Path(path), lambda temporary: temporary.write_bytes(model.data))
    return model


def segment_to_zarr(volume: str | os.PathLike | VolumeSource, labels: str | os.PathLike | np.ndarray, output: str | os.PathLike,
                    computation: FeatureComputation = FeatureComputation(), *, kind: str = DEFAULT_CLASSIFIER,
                    trees: int = 0, seed: int = 0, probabilities: str | os.PathLike | bool | None = None, levels: int = 0,
                    device: str = "auto", weights: dict[str, str] | None = None, client=None, overwrite: bool = False,
                    model: str | os.PathLike | None = None, progress: Progress | None = None) -> tuple[Path, Path | None]:
    """Train on a volume's labelled slices and write its label image, as `dinofeat segment` does for one stack.

    Parameters
    ----------
    volume : path or VolumeSource
        As for `classify_to_zarr`.
    labels : path or array
        Class values of the same shape (Z, Y, X): 0 unlabelled; slices without labels cost no training features.
    computation : FeatureComputation, optional
        The whole feature computation (set, backbone, preset, PCA, normalisation, input range); default: the
        multiscale bank, as the command line's.
    kind : {'extra_trees', 'random_forest', 'logistic', 'gradient_boosting'}, optional
        The classifier (default 'extra_trees', as `dinofeat segment`); `trees` (0: 200) and `seed` as `dinofeat segment`.
    model : path, optional
        Also save the trained model file (.dfm) here, for `dinofeat apply`.
    probabilities, levels, device, weights, client, overwrite, progress
        As for `classify_to_zarr`.

    Returns
    -------
    (Path, Path or None)
        The complete label image and probabilities stores.
    """
    output, wanted = checked_outputs(output, probabilities, overwrite, levels)
    report = progress or (lambda stage, done, total: None)
    fitted, trained = train_volume(volume, labels, computation, kind=kind, trees=trees, seed=seed,
                                   device=device, weights=weights, client=client, progress=report)
    model_file = save_model(trained, model)
    return classify_volume(client, fitted, model_file, trained, output, wanted, levels, report)
