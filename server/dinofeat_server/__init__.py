"""dinofeat feature server: the engine (torch), segmentation (scikit-learn) and the gRPC service."""

from dinofeat_client import __version__

__all__ = ["__version__"]
