"""Feature stacks into the JVM as labelled ImageJ stacks, a whole plane per call (no per-pixel calls)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..imagej_tiff import channel_names


def float_processor(plane: np.ndarray):
    """An ij.process.FloatProcessor holding a copy of a (Y, X) plane (one bulk copy through JPype's buffers)."""
    import jpype
    from ij.process import FloatProcessor  # noqa: I001 (Java package, importable once the JVM runs)

    plane = np.ascontiguousarray(plane, dtype=np.float32)
    pixels = jpype.JArray(jpype.JFloat)(plane.ravel())
    return FloatProcessor(plane.shape[1], plane.shape[0], pixels)


def labelled_stack(planes, names: list[str], width: int, height: int):
    """An ij.ImageStack of the (Y, X) `planes`, slice i labelled names[i] (TWS's attribute names)."""
    from ij import ImageStack

    stack = ImageStack(width, height)
    for name, plane in zip(names, planes):
        stack.addSlice(name, float_processor(plane))
    return stack


def stack_from_array(features: np.ndarray, names: list[str]):
    """An ij.ImageStack from a (C, Y, X) array."""
    return labelled_stack(iter(features), names, features.shape[2], features.shape[1])


def stack_from_h5(path: str | Path, z: int | None = None):
    """An ij.ImageStack of one slice (or a 2-D file) of a feature file, read channel by channel."""
    with h5py.File(path, "r") as f:
        dataset = f["features"]
        planes = (dataset[c] if dataset.ndim == 3 else dataset[c, z or 0] for c in range(dataset.shape[0]))
        return labelled_stack(planes, channel_names(dataset), dataset.shape[-1], dataset.shape[-2])


def array_from_processor(processor) -> np.ndarray:
    """A (Y, X) float32 copy of an ImageJ processor's pixels."""
    return np.array(processor.convertToFloatProcessor().getPixels(), dtype=np.float32).reshape(processor.getHeight(), processor.getWidth())


def array_from_stack(stack) -> np.ndarray:
    """A (N, Y, X) float32 copy of an ImageJ stack."""
    return np.stack([array_from_processor(stack.getProcessor(i + 1)) for i in range(stack.getSize())])
