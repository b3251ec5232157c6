"""Read and write image files (TIFF incl. 16-bit and stacks, PNG, JPEG) as numpy arrays, atomically.

Every failure is a DinofeatError with one sentence for the user; what an image must be is dinofeat.contract.images.
"""

from __future__ import annotations

import os
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import atomic_write


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode TIFF, PNG or JPEG into an array; TIFF stacks keep their Z axis."""
    path = Path(path)
    if not path.is_file():
        raise DinofeatError(f"cannot read {path}: no such file.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            image = imagecodecs.imread(str(path))
    except Exception as error:  # decoders raise many types; the user needs one sentence
        raise DinofeatError(f"cannot read {path}: not a readable TIFF, PNG or JPEG image, or the file is truncated ({type(error).__name__}).") from None
    return np.asarray(image)


def write_tiff(path: Path, array: np.ndarray) -> Path:
    """Write an array as TIFF (ImageJ-compatible for 2-D and stacks), atomically."""
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, array, imagej=array.dtype != np.int32))


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an 8-bit greyscale or RGB array as PNG, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(array))))
