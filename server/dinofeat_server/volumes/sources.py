"""Volumes that Dask workers read themselves, one plane at a time, from storage they share with the client.

A `VolumeSource` is small and picklable (a path and a description, or an array for in-memory use): it
travels to the workers inside the tasks, and each task opens the file and reads only its own plane. A
volume is a stack of Z planes, each (Y, X) greyscale or (Y, X, 3) RGB, the same planes the server's
`jobs.slices_of` gives for an uploaded stack; a 2-D image is a volume of one plane (`volume` False).

Formats: TIFF stacks (one page per plane, read page by page), OME-Zarr (NGFF 0.4/0.5 images: the
full-resolution level, axes named in the metadata; t and c of length 1 dropped, c of 3 as RGB), HDF5
(`FILE.h5` with one dataset of 2 or 3 dimensions, or `FILE.h5/path/to/dataset`), and numpy arrays.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dinofeat_client.errors import DinofeatError
from dinofeat_client.images import SUPPORTED_DTYPES, check_image, image_axes

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass(frozen=True)
class VolumeSource:
    """Where a volume's planes are read from: `kind` "tiff", "zarr", "hdf5" or "array"."""

    kind: str
    path: str
    shape: tuple[int, ...]
    """(Z, Y, X) or (Z, Y, X, 3): the planes as the engine sees them."""
    dtype: str
    volume: bool = True
    """False for a 2-D image (features (C, Y, X) rather than (C, Z, Y, X))."""
    dataset: str = ""
    """HDF5: the dataset's path in the file; OME-Zarr: the array's path in the group."""
    axes: str = ""
    """OME-Zarr: the stored array's axis letters (e.g. "tczyx"), to pick one plane out of it."""
    array: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def planes(self) -> int:
        return self.shape[0]

    @property
    def channels(self) -> int:
        """Image channels: 3 for RGB, else 1."""
        return 3 if len(self.shape) == 4 else 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(Z, Y, X) of a volume, (Y, X) of a 2-D image: the feature stack's shape without its channels."""
        spatial = self.shape[:3]
        return spatial if self.volume else spatial[1:]

    def plane(self, z: int) -> np.ndarray:
        """Plane z as the engine takes it (checked like an upload: dtype, RGBA without alpha, no NaN)."""
        return check_image(self._raw_plane(z), f"plane {z} of {self.path or 'the volume'}")

    def _raw_plane(self, z: int) -> np.ndarray:
        if self.kind == "array":
            return np.asarray(self.array[z])
        if self.kind == "tiff":
            import tifffile

            with tifffile.TiffFile(self.path) as tiff:
                return tiff_plane(self.path, tiff.series[0], z, self.planes) if self.volume else tiff.series[0].asarray()
        if self.kind == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as f:
                return f[self.dataset][z] if self.volume else f[self.dataset][()]
        if self.kind == "zarr":
            import zarr

            stored = zarr.open_array(os.path.join(self.path, self.dataset), mode="r")
            return zarr_plane(stored, self.axes, z)
        raise ValueError(self.kind)

    def lazy_planes(self) -> list[StoredPlane]:
        """Every plane as a `StoredPlane`: what `FeatureSet.fit_space` takes, reading one plane at a time."""
        return [StoredPlane(self, z) for z in range(self.planes)]

    def check_readable(self) -> str | None:
        """None when this process can open the volume and read its first plane, else why not (one phrase)."""
        try:
            self._raw_plane(0)
        except DinofeatError as error:
            return str(error)
        except Exception as error:  # readers raise many types; the user needs one phrase
            return f"{type(error).__name__}: {error}"
        return None


class StoredPlane:
    """One plane of a source, read when first needed and kept until dropped: `fit_space` walks the planes
    one after the other (input range, then crops), so a volume is never held whole on the client."""

    def __init__(self, source: VolumeSource, z: int):
        self.source, self.z = source, z
        self.shape = source.shape[1:]
        self.ndim = len(self.shape)
        self.dtype = np.dtype(source.dtype)

    def read(self) -> np.ndarray:
        return self.source.plane(self.z)

    def __array__(self, dtype=None, copy=None):
        plane = self.read()
        return plane if dtype is None else plane.astype(dtype)

    def __getitem__(self, window) -> np.ndarray:
        return self.read()[window]

    def reshape(self, *shape) -> np.ndarray:
        return self.read().reshape(*shape)

    def max(self):
        return self.read().max()

    def min(self):
        return self.read().min()


def zarr_plane(stored, axes: str, z: int) -> np.ndarray:
    """Plane z of an OME-Zarr array with axes `axes` ("zyx", "czyx", "tczyx", "yx", ...) as (Y, X) or (Y, X, 3)."""
    index = tuple(z if a == "z" else 0 if a == "t" else slice(None) for a in axes)
    plane = np.asarray(stored[index])
    kept = [a for a in axes if a in "cyx"]
    if "c" in kept:
        plane = np.moveaxis(plane, kept.index("c"), -1)
        plane = plane[..., 0] if plane.shape[-1] == 1 else plane
    return plane


def open_volume(volume: str | os.PathLike | np.ndarray) -> VolumeSource:
    """The `VolumeSource` of a path (TIFF, OME-Zarr, HDF5), an OME-Zarr URL or an array; one sentence when it
    cannot be read."""
    if isinstance(volume, np.ndarray):
        return array_source(volume)
    text = os.fspath(volume)
    if is_url(text):
        return zarr_source(text)
    path = Path(text)
    hdf5 = hdf5_parts(text)
    if hdf5 is not None:
        return hdf5_source(*hdf5)
    if not path.exists():
        raise DinofeatError(f"cannot read {text}: no such file or folder.")
    if path.is_dir():
        return zarr_source(text)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return tiff_source(text)
    raise DinofeatError(f"cannot read {text} as a volume: give a TIFF stack (.tif), an OME-Zarr folder (.zarr) or an HDF5 "
                        "file (.h5, optionally FILE.h5/DATASET).")


def is_url(text: str) -> bool:
    """Whether a volume is named by a URL (http://, https://, s3://, ...): an OME-Zarr that each worker reads
    itself through fsspec (http needs aiohttp, which ome-zarr brings; s3 needs s3fs, gs gcsfs)."""
    found = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+)://", text)
    return found is not None and found.group(1).lower() != "file"


def absolute_name(volume: str | os.PathLike) -> str:
    """A volume's name as workers elsewhere can use it: an absolute path, or the URL as given."""
    text = os.fspath(volume)
    return text if is_url(text) else os.path.abspath(text)


def array_source(image: np.ndarray) -> VolumeSource:
    image = check_image(image)
    volume = image_axes(image).startswith("z")
    stack = image if volume else image[None]
    return VolumeSource("array", "", tuple(stack.shape), stack.dtype.name, volume, array=stack)


def checked_shape(shape: tuple[int, ...], dtype: np.dtype, name: str) -> tuple[tuple[int, ...], bool]:
    """((Z, Y, X[, 3]), volume) of stored data of `shape`: length-1 axes beyond two dropped and RGBA read as RGB,
    as `check_image` does for an upload."""
    if np.dtype(dtype).name not in SUPPORTED_DTYPES and np.dtype(dtype) != bool:
        raise DinofeatError(f"{name} has samples of type {np.dtype(dtype)}, which is not supported; use 8- or 16-bit integers or floats.")
    shape = list(shape)
    while len(shape) > 2 and 1 in shape:
        shape.remove(1)
    axes = image_axes(np.broadcast_to(np.uint8(0), tuple(shape)))  # the axes of the shape, without any samples
    if axes.endswith("c"):
        shape[-1] = 3
    volume = axes.startswith("z")
    return (tuple(shape) if volume else (1, *shape)), volume


def tiff_plane(path: str, series, z: int, planes: int) -> np.ndarray:
    """Plane z of a TIFF stack: its own page when the stack has one page per plane, else a memory map of
    the contiguous, uncompressed data (tifffile writes stacks so), else (compressed, one page) all of it."""
    if len(series.pages) == planes:
        return series.pages[z].asarray()
    if series.dataoffset is not None:
        import tifffile

        return np.array(np.squeeze(tifffile.memmap(path, series=0, mode="r"))[z])
    return np.squeeze(series.asarray())[z]


def tiff_source(path: str) -> VolumeSource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            shape, dtype = tuple(series.shape), series.dtype
    except Exception as error:
        raise DinofeatError(f"cannot read {path}: not a readable TIFF ({type(error).__name__}).") from None
    stack, volume = checked_shape(shape, dtype, path)
    if volume and len(stack) != len([s for s in shape if s != 1]):
        raise DinofeatError(f"{path} has shape {shape} (a hyperstack with channels or time?); save it as a plain Z stack of "
                            "greyscale or RGB pages, or as OME-Zarr.")
    return VolumeSource("tiff", path, stack, np.dtype(dtype).name, volume)


def hdf5_parts(text: str) -> tuple[str, str] | None:
    """(file, dataset) of "FILE.h5" or "FILE.h5/DATASET"; None for other paths."""
    lowered = text.lower()
    for suffix in HDF5_SUFFIXES:
        end = lowered.find(suffix + "/")
        if lowered.endswith(suffix):
            return text, ""
        if end >= 0:
            return text[: end + len(suffix)], text[end + len(suffix) + 1 :]
    return None


def hdf5_source(path: str, dataset: str) -> VolumeSource:
    import h5py

    if not Path(path).is_file():
        raise DinofeatError(f"cannot read {path}: no such file.")
    try:
        with h5py.File(path, "r") as f:
            if not dataset:
                found: list[str] = []
                f.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) and item.ndim in (2, 3, 4) else None)
                if len(found) != 1:
                    raise DinofeatError(f"{path} holds {len(found)} image datasets ({', '.join(found[:4])}); name one as {path}/DATASET.")
                dataset = found[0]
            if dataset not in f:
                raise DinofeatError(f"{path} has no dataset {dataset!r}.")
            shape, dtype = f[dataset].shape, f[dataset].dtype
    except OSError as error:
        raise DinofeatError(f"cannot read {path}: not an HDF5 file ({error}).") from None
    stack, volume = checked_shape(tuple(shape), dtype, f"{path}/{dataset}")
    if volume and len(stack) != len(shape):
        raise DinofeatError(f"{path}/{dataset} has shape {tuple(shape)}; store the volume as (Z, Y, X) or (Z, Y, X, 3).")
    return VolumeSource("hdf5", path, stack, np.dtype(dtype).name, volume, dataset=dataset)


def zarr_source(path: str) -> VolumeSource:
    """The full-resolution level of an OME-Zarr image (its multiscales metadata), or a plain Zarr array."""
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except ImportError as error:  # fsspec's protocol packages: s3fs, gcsfs, ...
        raise DinofeatError(f"cannot read {path}: {error}") from None
    except Exception as error:
        what = "an OME-Zarr at that URL" if is_url(path) else "a Zarr folder"
        raise DinofeatError(f"cannot read {path}: not {what} ({type(error).__name__}).") from None
    if isinstance(node, zarr.Array):
        array_path, axes, stored = "", "zyx"[-node.ndim:] if node.ndim <= 3 else "", node
    else:
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise DinofeatError(f"{path} is a Zarr group without OME-Zarr multiscales metadata; give an OME-Zarr image.")
        image = multiscales[0]
        array_path = image["datasets"][0]["path"]
        axes = "".join(a["name"] if isinstance(a, dict) else a for a in image.get("axes", [])) or "tczyx"[-node[array_path].ndim:]
        stored = node[array_path]
    if not axes or set(axes) - set("tczyx") or len(axes) != stored.ndim:
        raise DinofeatError(f"{path} has axes {axes or stored.shape!r}; dinofeat reads t, c, z, y and x.")
    sizes = dict(zip(axes, stored.shape))
    if sizes.get("t", 1) != 1 or sizes.get("c", 1) not in (1, 3, 4):
        raise DinofeatError(f"{path} has {sizes.get('t', 1)} time points and {sizes.get('c', 1)} channels; dinofeat reads one "
                            "time point of a greyscale or RGB image.")
    colour = (3,) if sizes.get("c", 1) in (3, 4) else ()
    shape = (sizes.get("z", 1), sizes["y"], sizes["x"], *colour)
    if stored.dtype.name not in SUPPORTED_DTYPES:
        raise DinofeatError(f"{path} has samples of type {stored.dtype}, which is not supported; use 8- or 16-bit integers or floats.")
    return VolumeSource("zarr", path, shape, stored.dtype.name, "z" in axes and sizes["z"] > 1, dataset=array_path, axes=axes)
