"""Trained classifiers as files that are safe to load: a zip of `metadata.json` and the classifier
in skops format, loaded with an explicit list of trusted types (no pickle, no code from the file).

The metadata stores what the classifier was trained on (feature set, options, spec, channel count,
class values) and the feature space fitted over its training images, so a new image is expressed in
the same basis and features of another kind fail with a clear sentence.

Format /2 added the feature space. /1 files of the classical set still load (its space is fixed, not
fitted); /1 files of deep sets are refused with a sentence that says to retrain, since the basis
their classifier learnt in was never stored.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass

import skops.io as sio
from dinofeat.contract.computation import FeatureComputation, stored_computation
from dinofeat.contract.errors import DinofeatError
from sklearn.base import ClassifierMixin

from ..engine.space import FeatureSpace
from .classifier_checks import check_classifier, classifier_kind, held_bytes

FORMAT = "dinofeat-model/2"
OLD_FORMAT = "dinofeat-model/1"
TRUSTED_TYPES = {
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
}
"""Types skops does not trust by default that our own classifiers contain; anything else is refused."""


@dataclass
class TrainedModel:
    classifier: ClassifierMixin
    metadata: dict
    unpacked_bytes: int = 0
    """Bytes the model holds in memory once loaded (metadata and the classifier's arrays and objects, however
    small the file); 0 when not read from a file."""

    def space(self) -> FeatureSpace | None:
        """The feature space of the training images (None for /1 classical models: fixed, not fitted)."""
        stored = self.metadata.get("feature_space")
        return FeatureSpace.from_dict(stored) if stored else None

    def computation(self) -> FeatureComputation:
        """The feature computation the classifier was trained on (rebuilt for files of an earlier dinofeat)."""
        stored = self.metadata.get("computation")
        if stored:
            return stored_computation(stored)
        spec = {**self.metadata.get("feature_spec", {}), "name": self.metadata["feature_set"]}
        return stored_computation(None, spec)

    def check_features(self, feature_set: str, channels: int) -> None:
        """Refuse features of another set or channel count than the classifier was trained on."""
        trained_on = self.metadata["feature_set"]
        if feature_set != trained_on:
            raise DinofeatError(f"the model was trained on {trained_on!r} features, not {feature_set!r}; "
                                f"apply it with --set {trained_on} or train a new one.")
        if channels != self.metadata["channels"]:
            raise DinofeatError(f"the model expects {self.metadata['channels']} feature channels but this image gives "
                                f"{channels}; apply it to images like the training ones (greyscale vs RGB).")


def model_bytes(model: TrainedModel) -> bytes:
    """The model file's bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", json.dumps({"format": FORMAT, **model.metadata}, indent=2))
        archive.writestr("classifier.skops", sio.dumps(model.classifier))
    return buffer.getvalue()


MEMBER_LIMITS = {"metadata.json": 64 << 20, "classifier.skops": 1 << 30}
"""Largest decompressed size of each member read from a model file (a zip bomb stops here)."""


def bounded_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, refused when its declared or its actual decompressed size passes its limit."""
    limit = MEMBER_LIMITS[name]
    if archive.getinfo(name).file_size > limit:
        raise DinofeatError(f"the model file's {name} would unpack to more than {limit >> 20} MiB; "
                            "only models written by dinofeat are accepted.")
    with archive.open(name) as member:
        data = member.read(limit + 1)  # the declared size may lie: never inflate more than the limit
    if len(data) > limit:
        raise DinofeatError(f"the model file's {name} unpacks to more than {limit >> 20} MiB; only models written by dinofeat are accepted.")
    return data


def check_nested_members(classifier_data: bytes) -> None:
    """Refuse a classifier whose own members (skops writes a zip of JSON and .npy files) would unpack to more than
    the classifier's limit together; zipfile never inflates a member past its declared size."""
    limit = MEMBER_LIMITS["classifier.skops"]
    try:
        with zipfile.ZipFile(io.BytesIO(classifier_data)) as archive:
            declared = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError):
        raise DinofeatError("the model file's classifier is damaged; train the model again.") from None
    if declared > limit:
        raise DinofeatError(f"the model file's classifier would unpack to more than {limit >> 20} MiB; only models written by "
                            "dinofeat are accepted.")


METADATA_TYPES = {"feature_set": str, "channels": int, "options": dict, "computation": dict, "feature_spec": dict,
                  "feature_space": dict, "class_values": list, "classifier": dict, "labelled_pixels": int,
                  "training_images": list, "dinofeat_version": str}
"""The metadata keys dinofeat reads and their JSON types; feature_set and channels are in every model file."""
JSON_TYPES = {str: "string", int: "integer", dict: "object", list: "array"}
MAX_MODEL_CHANNELS = 1 << 16


def check_metadata(metadata: dict) -> None:
    """Refuse metadata without a feature set and channel count, or with a key of another JSON type than dinofeat writes."""
    for key in ("feature_set", "channels"):
        if key not in metadata:
            raise DinofeatError(f"the model file's metadata has no {key!r}; only models written by dinofeat are accepted.")
    for key, kind in METADATA_TYPES.items():
        value = metadata.get(key, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DinofeatError(f"the model file's metadata {key!r} is not a JSON {JSON_TYPES[kind]}; only models written by "
                                "dinofeat are accepted.")
    if not 1 <= metadata["channels"] <= MAX_MODEL_CHANNELS:
        raise DinofeatError(f"the model file's metadata gives {metadata['channels']} channels, not between 1 and "
                            f"{MAX_MODEL_CHANNELS}; only models written by dinofeat are accepted.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in metadata.get("class_values", [])):
        raise DinofeatError("the model file's metadata class_values are not integers; only models written by dinofeat are accepted.")


def filled_metadata(metadata: dict, classifier: ClassifierMixin) -> dict:
    """Metadata with what prediction reports filled in where a file leaves it out: the classes and kind its
    classifier says, the feature set's name as its spec, default options, 0 labelled pixels (not recorded)."""
    stored = {"kind": classifier_kind(classifier), **metadata.get("classifier", {})}
    return {"class_values": [int(v) for v in classifier.classes_], "feature_spec": {"name": metadata["feature_set"]},
            "options": {}, "labelled_pixels": 0, **metadata, "classifier": stored}


def loaded_classifier(classifier_data: bytes) -> ClassifierMixin:
    """The classifier of a checked skops member, holding only trusted types (any failure to load: one sentence)."""
    check_nested_members(classifier_data)
    try:
        untrusted = set(sio.get_untrusted_types(data=classifier_data))
    except Exception:
        raise DinofeatError("the model file's classifier is damaged; train the model again.") from None
    if untrusted - TRUSTED_TYPES:
        raise DinofeatError(f"the model file holds types dinofeat does not load ({', '.join(sorted(untrusted - TRUSTED_TYPES))}); "
                            "only models written by dinofeat are accepted.")
    try:
        return sio.loads(classifier_data, trusted=sorted(untrusted))
    except Exception:  # skops and scikit-learn refuse malformed parts with many kinds of error
        raise DinofeatError("the model file's classifier is damaged; train the model again.") from None


def model_from_bytes(data: bytes) -> TrainedModel:
    """Read a model file, refusing anything that is not one, holds untrusted types, unpacks too large, or whose
    classifier is not one dinofeat trains with every array in range (classifier_checks.py)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            metadata_data = bounded_member(archive, "metadata.json")
            metadata = json.loads(metadata_data)
            classifier_data = bounded_member(archive, "classifier.skops")
    except (zipfile.BadZipFile, KeyError, ValueError, RecursionError, zlib.error, EOFError, OSError):
        raise DinofeatError("this is not a dinofeat model file, or it is damaged (train one with `dinofeat train`).") from None
    if not isinstance(metadata, dict):
        raise DinofeatError("the model file's metadata is not a JSON object; only models written by dinofeat are accepted.")
    if metadata.get("format") == OLD_FORMAT and metadata.get("feature_set") != "classical":
        raise DinofeatError(f"the model file ({OLD_FORMAT}) was trained on {metadata.get('feature_set')!r} features without "
                            "storing their feature space; train it again with this dinofeat.")
    if metadata.get("format") not in (FORMAT, OLD_FORMAT):
        raise DinofeatError(f"the model file has format {metadata.get('format')!r}; this dinofeat reads {FORMAT} (and {OLD_FORMAT} "
                            "classical models).")
    check_metadata(metadata)
    classifier = loaded_classifier(classifier_data)
    check_classifier(classifier, metadata["channels"], metadata.get("class_values"))
    metadata.pop("format")
    model = TrainedModel(classifier, filled_metadata(metadata, classifier), len(metadata_data) + held_bytes(classifier))
    model.space()  # a malformed feature space is refused now, not when the model is applied
    return model
