"""What an image must be, on either side of the wire: its axes, dtypes, labels and masks, and its content address.

Every failure is a DinofeatError with one sentence for the user; nothing here imports torch.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import DinofeatError

SUPPORTED_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "uint32", "float32", "float64")
LABEL_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "uint32")


def image_axes(image: np.ndarray) -> str:
    """Axis letters of an image array: "yx", "yxc" (RGB/RGBA), "zyx" or "zyxc"."""
    if image.ndim == 2:
        return "yx"
    if image.ndim == 3:
        return "yxc" if image.shape[-1] in (3, 4) else "zyx"
    if image.ndim == 4 and image.shape[-1] in (3, 4):
        return "zyxc"
    raise DinofeatError(f"images must be 2-D, RGB, or a stack of 2-D slices; this one has shape {image.shape}.")


def image_channels(image: np.ndarray) -> int:
    """Channels of each pixel: 3 for an RGB image or stack of RGB slices, else 1."""
    return 3 if image_axes(image).endswith("c") else 1


def without_singleton_axes(array: np.ndarray) -> np.ndarray:
    """`array` without length-1 axes beyond two: ImageJ and many scripts save one 2-D image as
    (1, Y, X), (Y, X, 1) or (1, 1, Y, X)."""
    while array.ndim > 2 and 1 in array.shape:
        array = array.squeeze(axis=array.shape.index(1))
    return array


def check_image(image: np.ndarray, name: str = "the image") -> np.ndarray:
    """Return a supported image (RGBA loses alpha, length-1 axes dropped) or raise one clear sentence
    saying what is wrong."""
    if image.size == 0:
        raise DinofeatError(f"{name} is empty (shape {image.shape}); give an image with pixels.")
    image = without_singleton_axes(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.dtype.name not in SUPPORTED_DTYPES:
        raise DinofeatError(f"{name} has samples of type {image.dtype}, which is not supported; use 8- or 16-bit integers or floats.")
    axes = image_axes(image)
    if axes.endswith("c") and image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise DinofeatError(f"{name} contains NaN or infinite values; replace them before computing features.")
    if min(image.shape[axes.index("y")], image.shape[axes.index("x")]) < 2:
        raise DinofeatError(f"{name} is too small ({image.shape}); it needs at least 2 x 2 pixels.")
    return np.ascontiguousarray(image)


def spatial_shape(image: np.ndarray) -> tuple[int, ...]:
    """(Y, X) or (Z, Y, X): the image's shape without its colour axis (what a label image must match)."""
    return image.shape[:-1] if image_axes(image).endswith("c") else image.shape


def check_labels(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Labels: integers, one value per pixel of the image (length-1 axes dropped), 0 unlabelled, at
    least two other values."""
    spatial = spatial_shape(image)
    labels = without_singleton_axes(labels)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and labels.shape[:2] == spatial:
        raise DinofeatError("the label image is RGB; save the labels as a single-channel image of class values.")
    if labels.shape != spatial:
        raise DinofeatError(f"the label image has shape {labels.shape} but the image has {spatial}; they must match pixel for pixel.")
    if labels.dtype.name not in LABEL_DTYPES:
        raise DinofeatError(f"the label image has samples of type {labels.dtype}; use 8- or 16-bit integer class values.")
    classes = np.unique(labels)
    classes = classes[classes != 0]
    if len(classes) < 2:
        raise DinofeatError(f"the label image has {len(classes)} class(es) besides 0 (unlabelled); label at least two classes.")
    return np.ascontiguousarray(labels)


def check_mask(mask: np.ndarray, image: np.ndarray, name: str = "the support mask") -> np.ndarray:
    """A support mask (length-1 axes dropped): one value per pixel of its image, some of it non-zero."""
    spatial, squeezed = spatial_shape(image), without_singleton_axes(mask)
    if squeezed.shape != spatial:
        saved = f"{mask.shape} ({squeezed.shape} without its length-1 axes)" if squeezed.shape != mask.shape else f"{mask.shape}"
        raise DinofeatError(f"{name} has shape {saved} but its image has {spatial}; they must match pixel for pixel.")
    if not squeezed.any():
        raise DinofeatError(f"{name} is empty; mark the object in every support image.")
    return squeezed


def image_sha256(image: np.ndarray) -> str:
    """Content address of an array: sha256 over its dtype, shape and little-endian samples."""
    digest = hashlib.sha256(f"{image.dtype.newbyteorder('<').str}{list(image.shape)}".encode())
    digest.update(np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


