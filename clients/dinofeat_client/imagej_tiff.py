"""Feature files as ImageJ hyperstack TIFFs, which Fiji opens without any plug-in.

float32, one plane per channel (and slice), each plane labelled with its channel name so that
Trainable Weka Segmentation shows readable attribute names. Written one plane at a time from the
HDF5 file, so a large stack never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import tifffile

from dinofeat.contract.outputs import atomic_write


def channel_names(dataset: h5py.Dataset) -> list[str]:
    """The `channel_names` attribute of a dataset as text (c0, c1, ... when it has none)."""
    names = dataset.attrs.get("channel_names")
    if names is None:
        return [f"c{i}" for i in range(dataset.shape[0])]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def dataset_planes(dataset: h5py.Dataset) -> Iterator[np.ndarray]:
    """The (Y, X) float32 planes of a (C, Y, X) or (C, Z, Y, X) dataset in ImageJ's order: slice, then channel."""
    slices = dataset.shape[1] if dataset.ndim == 4 else 1
    for z in range(slices):
        for c in range(dataset.shape[0]):
            yield np.asarray(dataset[c, z] if dataset.ndim == 4 else dataset[c], dtype=np.float32)


def write_imagej_hyperstack(dataset: h5py.Dataset, path: str | Path) -> Path:
    """Write a feature dataset as an ImageJ hyperstack TIFF (axes ZCYX), atomically."""
    channels, (height, width) = dataset.shape[0], dataset.shape[-2:]
    slices = dataset.shape[1] if dataset.ndim == 4 else 1
    labels = channel_names(dataset) * slices

    def write(temporary: Path) -> None:
        with tifffile.TiffWriter(temporary, imagej=True) as tiff:
            tiff.write(dataset_planes(dataset), shape=(slices, channels, height, width), dtype=np.float32,
                       metadata={"axes": "ZCYX", "Labels": labels}, contiguous=True)

    return atomic_write(Path(path), write)
