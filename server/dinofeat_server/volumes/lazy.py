"""Features of an image or volume as a lazy `dask.array`, for notebooks.

The space is fitted when the array is made (in this process, or in one task on the given client's
workers); every slice's features are one task, computed when the array (or a part of it) is.
"""

from __future__ import annotations

import os

import numpy as np

from dinofeat.contract.computation import FeatureComputation

from ..engine.space import FeatureSpace
from .dask_run import fitted_on, request_for
from .sources import VolumeSource
from .tasks import FittedVolume, fit_volume, slice_features


def lazy_features(volume: str | os.PathLike | np.ndarray | VolumeSource, computation: FeatureComputation = FeatureComputation(),
                  *, device: str = "auto", weights: dict[str, str] | None = None,
                  client=None, like: FeatureSpace | None = None):
    """The features of `volume` as a lazy dask array in one fitted feature space.

    Parameters
    ----------
    volume : path, array or VolumeSource
        A TIFF stack, OME-Zarr or HDF5 path (read by whoever computes), or an array (Z, Y, X), (Z, Y, X, 3),
        (Y, X) or (Y, X, 3).
    computation : FeatureComputation, optional
        The whole feature computation (set, backbone, preset, PCA, normalisation, input range); default: the
        multiscale bank, as the command line's.
    device, weights, like
        As for `features_to_zarr`.
    client : distributed.Client, optional
        Fit the space on its workers; the array is then computed wherever dask computes (the client, once
        made, is dask's default). None: fit here.

    Returns
    -------
    dask.array.Array
        float32 (C, Z, Y, X) for a volume, (C, Y, X) for a 2-D image (the HDF5 output's axis order), one chunk per
        slice (C, 1, Y, X). Its channel names and space: `fitted_features` gives them with the array.
    """
    return fitted_features(volume, computation, device=device, weights=weights, client=client, like=like)[0]


def fitted_features(volume, computation: FeatureComputation = FeatureComputation(), *, device: str = "auto",
                    weights: dict[str, str] | None = None, client=None, like: FeatureSpace | None = None):
    """(the lazy array of `lazy_features`, the FittedVolume with its channel names and space)."""
    import dask
    import dask.array as da

    fitted: FittedVolume = fitted_on(client, fit_volume, request_for(volume, computation, device, weights), like)
    source = fitted.request.source
    shared = dask.delayed(fitted, traverse=False)
    slices = [da.from_delayed(dask.delayed(slice_features, pure=True)(shared, z), shape=(len(fitted.channel_names), *source.shape[1:3]),
                              dtype=np.float32) for z in range(source.planes)]
    array = da.stack(slices, axis=1) if source.volume else slices[0]
    return array, fitted
