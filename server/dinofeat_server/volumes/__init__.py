"""Volumes beyond one machine: Dask tasks over shared storage, OME-Zarr in and out, lazy dask arrays.

Needs the `volumes` extra (dask, distributed, zarr, ome-zarr). Modules: `sources` (volumes read one plane
at a time), `tasks` (fit a space, compute or write one slice: the engine, as the server calls it),
`worker_models` (one loaded model per worker process), `zarr_io` (the OME-Zarr stores: features, label images with
their pyramid), `dask_run` (a run on a cluster or in this process), `classify` (train on a volume's labelled slices,
apply a model to every slice), `lazy` (dask arrays for notebooks).
"""

from importlib.util import find_spec

_missing = [name for name in ("dask", "distributed", "zarr", "ome_zarr") if find_spec(name) is None]
if _missing:  # the extra's packages: a missing one is an ImportError at once, not in the middle of a run
    raise ImportError(f"dinofeat_server.volumes needs {', '.join(_missing)} (pip install dinofeat[server,volumes])")

from ..engine.space import FeatureSpace
from .classify import classify_to_zarr, save_model, segment_to_zarr, train_volume
from .dask_run import dask_client, dask_security, features_to_zarr
from .lazy import fitted_features, lazy_features
from .sources import VolumeSource, open_volume
from .zarr_io import open_features

__all__ = ["FeatureSpace", "VolumeSource", "classify_to_zarr", "dask_client", "dask_security", "features_to_zarr", "fitted_features",
           "lazy_features", "open_features", "open_volume", "save_model", "segment_to_zarr",
           "train_volume"]
