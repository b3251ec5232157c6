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
from dinofeat_client.errors import DinofeatError
from sklearn.base import ClassifierMixin

from ..engine.space import FeatureSpace

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
    """Bytes of the file's members unpacked (about the memory the model holds); 0 when not read from a file."""

    def space(self) -> FeatureSpace | None:
        """The feature space of the training images (None for /1 classical models: fixed, not fitted)."""
        stored = self.metadata.get("feature_space")
        return FeatureSpace.from_dict(stored) if stored else None

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


def model_from_bytes(data: bytes) -> TrainedModel:
    """Read a model file, refusing anything that is not one, holds untrusted types or unpacks too large."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            metadata_data = bounded_member(archive, "metadata.json")
            metadata = json.loads(metadata_data)
            classifier_data = bounded_member(archive, "classifier.skops")
    except (zipfile.BadZipFile, KeyError, ValueError, zlib.error, EOFError, OSError):
        raise DinofeatError("this is not a dinofeat model file, or it is damaged (train one with `dinofeat train`).") from None
    if not isinstance(metadata, dict):
        raise DinofeatError("the model file's metadata is not a JSON object; only models written by dinofeat are accepted.")
    if metadata.get("format") == OLD_FORMAT and metadata.get("feature_set") != "classical":
        raise DinofeatError(f"the model file ({OLD_FORMAT}) was trained on {metadata.get('feature_set')!r} features without "
                            "storing their feature space; train it again with this dinofeat.")
    if metadata.get("format") not in (FORMAT, OLD_FORMAT):
        raise DinofeatError(f"the model file has format {metadata.get('format')!r}; this dinofeat reads {FORMAT} (and {OLD_FORMAT} "
                            "classical models).")
    try:
        untrusted = set(sio.get_untrusted_types(data=classifier_data))
    except Exception:
        raise DinofeatError("the model file's classifier is damaged; train the model again.") from None
    if untrusted - TRUSTED_TYPES:
        raise DinofeatError(f"the model file holds types dinofeat does not load ({', '.join(sorted(untrusted - TRUSTED_TYPES))}); "
                            "only models written by dinofeat are accepted.")
    classifier = sio.loads(classifier_data, trusted=sorted(untrusted))
    metadata.pop("format")
    return TrainedModel(classifier, metadata, len(metadata_data) + len(classifier_data))
