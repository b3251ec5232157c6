"""What a model file records beside its classifier, for models trained on uploads and on volumes alike."""

from __future__ import annotations

from dinofeat import __version__
from dinofeat.contract.computation import FeatureComputation
from sklearn.base import ClassifierMixin

from ..engine.space import FeatureSpace
from ..engine.stacks import FeatureSet
from .classifiers import DEFAULT_TREES, class_values, forest_limits


def model_metadata(fset: FeatureSet, computation: FeatureComputation, channels: int, space: FeatureSpace,
                   classifier: ClassifierMixin, kind: str, trees: int, seed: int, labelled: int,
                   training_images: list[str] | str) -> dict:
    """The features and their space, the classes, the classifier's settings and what it was trained on (images'
    sha256, or a volume's path)."""
    return {
        "feature_set": fset.name, "computation": fset.described(computation, space), "feature_spec": fset.spec(computation),
        "channels": channels,
        "feature_space": space.to_dict(),
        "class_values": class_values(classifier), "classifier": {"kind": kind, "trees": trees or DEFAULT_TREES, "seed": seed,
                                                                  "class_weight": "balanced", **forest_limits(classifier)},
        "labelled_pixels": int(labelled), "training_images": training_images,
        "dinofeat_version": __version__,
    }
