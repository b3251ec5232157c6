"""What a feature dataset says about itself: the attributes of an HDF5 feature dataset and of an OME-Zarr feature
store, one function for uploaded images and volumes alike."""

from __future__ import annotations

from dinofeat import __version__
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.wire import axistags

from .space import FeatureSpace
from .stacks import FeatureSet, Models


def feature_attributes(fset: FeatureSet, computation: FeatureComputation, models: Models, names: list[str],
                       space: FeatureSpace, volume: bool, source: dict) -> dict:
    """Axes, channel names, the set, the description of the computation, backbone and weights, the space and
    `source` (sha256 or path, shape and dtype of what the features were computed from)."""
    return {
        "axistags": axistags("czyx" if volume else "cyx"),
        "channel_names": names,
        "feature_set": fset.spec(computation),
        "computation": fset.described(computation, space),
        "backbone": computation.backbone if fset.deep else "",
        "weights_sha256": fset.weights_sha256(computation, models),
        "dinofeat_version": __version__,
        **source,
        "feature_space": space.to_dict(),
    }
