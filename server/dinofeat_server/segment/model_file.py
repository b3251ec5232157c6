"""Trained classifiers as files that are safe to load: a zip of `metadata.json` and the classifier
in skops format, loaded with an explicit list of trusted types (no pickle, no code from the file).

The metadata stores what the classifier was trained on (feature set, options, spec, channel count,
class values), so applying it to features of another kind fails with a clear sentence.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass

import skops.io as sio
from dinofeat_client.errors import DinofeatError
from sklearn.base import ClassifierMixin

FORMAT = "dinofeat-model/1"
TRUSTED_TYPES = {
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
}
"""Types skops does not trust by default that our own classifiers contain; anything else is refused."""


@dataclass
class TrainedModel:
    classifier: ClassifierMixin
    metadata: dict

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


def model_from_bytes(data: bytes) -> TrainedModel:
    """Read a model file, refusing anything that is not one or holds untrusted types."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            metadata = json.loads(archive.read("metadata.json"))
            classifier_data = archive.read("classifier.skops")
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise DinofeatError("this is not a dinofeat model file (train one with `dinofeat train`).") from None
    if metadata.get("format") != FORMAT:
        raise DinofeatError(f"the model file has format {metadata.get('format')!r}; this dinofeat reads {FORMAT}.")
    try:
        untrusted = set(sio.get_untrusted_types(data=classifier_data))
    except Exception:
        raise DinofeatError("the model file's classifier is damaged; train the model again.") from None
    if untrusted - TRUSTED_TYPES:
        raise DinofeatError(f"the model file holds types dinofeat does not load ({', '.join(sorted(untrusted - TRUSTED_TYPES))}); "
                            "only models written by dinofeat are accepted.")
    classifier = sio.loads(classifier_data, trusted=sorted(untrusted))
    metadata.pop("format")
    return TrainedModel(classifier, metadata)
