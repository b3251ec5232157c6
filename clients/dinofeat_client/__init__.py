"""dinofeat thin client: talk to a dinofeat feature server and write standard HDF5 files (no torch).

What a script needs is here: `FeatureClient` (one server's calls), `FeatureComputation` (the one description of
a feature computation: set, backbone, preset, PCA, normalisation, input range) and `SETS` (the feature sets a
server offers, with their channel counts).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinofeat")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from .client import FeatureClient  # noqa: E402
from .computation import FeatureComputation  # noqa: E402
from .feature_sets import SETS, SetInfo  # noqa: E402

__all__ = ["FeatureClient", "FeatureComputation", "SETS", "SetInfo", "__version__"]
