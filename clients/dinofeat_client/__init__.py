"""dinofeat thin client: talk to a dinofeat feature server and write standard HDF5 files (no torch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinofeat")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
