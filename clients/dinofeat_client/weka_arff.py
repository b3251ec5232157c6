"""Labelled pixels and their features as a Weka ARFF file, for training in the Weka GUI (no TWS needed).

One row per labelled pixel: every feature channel as a numeric attribute named after the channel,
then the nominal attribute `class` with the label values. Read channel by channel from the HDF5 file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import atomic_write

from .imagej_tiff import channel_names


def arff_name(name: str) -> str:
    """A quoted ARFF identifier (quotes and backslashes escaped)."""
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def labelled_features(dataset: h5py.Dataset, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) features and (N,) label values of the labelled pixels (label != 0), in raster order."""
    mask = labels != 0
    if not mask.any():
        raise DinofeatError("the label image has no labelled pixels; mark some pixels of each class.")
    if mask.shape != dataset.shape[1:]:
        raise DinofeatError(f"the labels have shape {mask.shape} but the features cover {dataset.shape[1:]}; they must match.")
    samples = np.empty((int(mask.sum()), dataset.shape[0]), np.float32)
    for c in range(dataset.shape[0]):
        samples[:, c] = dataset[c][mask]
    return samples, labels[mask]


def write_arff(dataset: h5py.Dataset, labels: np.ndarray, path: str | Path, relation: str = "dinofeat") -> Path:
    """Write the labelled pixels of `labels` with their features from `dataset` as ARFF, atomically."""
    samples, classes = labelled_features(dataset, labels)
    values = [str(v) for v in np.unique(classes)]
    header = [f"@relation {arff_name(relation)}", ""]
    header += [f"@attribute {arff_name(name)} numeric" for name in channel_names(dataset)]
    header += [f"@attribute class {{{','.join(values)}}}", "", "@data"]

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as out:
            out.write("\n".join(header) + "\n")
            for start in range(0, len(samples), 65536):
                rows = samples[start : start + 65536]
                text = [",".join(f"{v:.9g}" for v in row) + f",{cls}" for row, cls in zip(rows, classes[start : start + 65536])]
                out.write("\n".join(text) + "\n")

    return atomic_write(Path(path), write)
