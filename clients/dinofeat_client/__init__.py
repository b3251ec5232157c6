"""dinofeat thin client: talk to a dinofeat feature server and write standard HDF5 files (no torch).

What a script needs is here: `FeatureClient` (one server's calls), `FeatureComputation` (the one description of
a feature computation: set, backbone, preset, PCA, normalisation, input range) and `SETS` (the feature sets a
server offers, with their channel counts).
"""

from dinofeat import __version__
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.feature_sets import SETS, SetInfo

from .client import FeatureClient

__all__ = ["FeatureClient", "FeatureComputation", "SETS", "SetInfo", "__version__"]
