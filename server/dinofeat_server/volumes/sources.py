"""Volumes that Dask workers read themselves, one plane at a time, from storage they share with the client.

A `VolumeSource` is small and picklable (a path and a description, or an array for in-memory use): it
travels to the workers inside the tasks, and each task opens the file and reads only its own plane. A
volume is a stack of Z planes, each (Y, X) greyscale or (Y, X, 3) RGB, the same planes the server's
`blocks.slices_of` gives for an uploaded stack; a 2-D image is a volume of one plane (`volume` False).

Formats: TIFF stacks (one page per plane, read page by page), OME-Zarr (NGFF 0.4/0.5 images: the
full-resolution level, axes named in the metadata; t and c of length 1 dropped, c of 3 as RGB), HDF5
(`FILE.h5` with one dataset of 2 or 3 dimensions, or `FILE.h5/path/to/dataset`), and numpy arrays.

Inputs are read as the user meant, not as their files say: an OME-Zarr's dataset paths stay inside its store,
an HDF5 dataset's samples inside its file (no external storage, no links or virtual sources in other files),
an http(s) store is read from allowed hosts only (`remote.HostAllowance`), malformed metadata is one sentence,
and a declared shape beyond `plane_pixels_limit()` or `MAX_PLANES` is refused before anything is allocated.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import SUPPORTED_DTYPES, check_image, image_axes

from .remote import HostAllowance, is_http

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
PLANE_PIXELS_VARIABLE = "DINOFEAT_MAX_PLANE_PIXELS"
MAX_PLANE_PIXELS = 1 << 28
"""Y x X of one plane at most unless $DINOFEAT_MAX_PLANE_PIXELS says otherwise (268,435,456: 16384 x 16384): a worker
holds a whole plane."""
MAX_PLANES = 1 << 20
"""Z at most: one task per plane."""
MAX_LINK_HOPS = 32


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
    hosts: HostAllowance = HostAllowance()
    """An http(s) OME-Zarr: the hosts it may be read from (set where the command runs, enforced on every worker)."""
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
                self._check_unchanged(checked_shape(tiff.series[0].shape, tiff.series[0].dtype, self.path)[0])
                return tiff_plane(self.path, tiff.series[0], z, self.planes) if self.volume else tiff.series[0].asarray()
        if self.kind == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as f:
                stored = hdf5_dataset(f, self.path, self.dataset)
                self._check_unchanged(checked_shape(stored.shape, stored.dtype, self.path)[0])
                return stored[z] if self.volume else stored[()]
        if self.kind == "zarr":
            try:
                stored = zarr_array(self.path, self.dataset, self.hosts)
                self._check_unchanged(zarr_shape(self.path, stored.shape, self.axes))
                return zarr_plane(stored, self.axes, z)
            except Exception as error:  # a refused host or redirect arrives wrapped by the transport
                raise zarr_refusal(self.path, error) from None
        raise ValueError(self.kind)

    def _check_unchanged(self, shape: tuple[int, ...]) -> None:
        """Refuse to read a volume whose stored shape is no longer the one checked when it was opened."""
        if tuple(shape) != self.shape:
            raise DinofeatError(f"{self.path} changed since the run began (shape {tuple(shape)}, not {self.shape}); run again.")

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


def check_size(shape: tuple[int, ...], name: str) -> None:
    """Refuse a declared (Z, Y, X[, 3]) beyond `plane_pixels_limit()` or `MAX_PLANES`, before anything is read or allocated."""
    planes, rows, columns = shape[:3]
    most = plane_pixels_limit()
    if rows * columns > most or planes > MAX_PLANES:
        raise DinofeatError(f"{name} declares {planes} planes of {rows} x {columns} pixels, beyond the limit of {MAX_PLANES} "
                            f"planes of {most} pixels; crop or tile it (or raise {PLANE_PIXELS_VARIABLE} if the data really "
                            "is that large).")


def plane_pixels_limit() -> int:
    """The most pixels of one plane: $DINOFEAT_MAX_PLANE_PIXELS where the command runs, else `MAX_PLANE_PIXELS`."""
    text = os.environ.get(PLANE_PIXELS_VARIABLE, "").strip()
    if not text:
        return MAX_PLANE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise DinofeatError(f"{PLANE_PIXELS_VARIABLE} is {text!r}; give a number of pixels, such as {MAX_PLANE_PIXELS}.")
    return int(text)


def checked_shape(shape: tuple[int, ...], dtype: np.dtype, name: str) -> tuple[tuple[int, ...], bool]:
    """((Z, Y, X[, 3]), volume) of stored data of `shape`: length-1 axes beyond two dropped and RGBA read as RGB,
    as `check_image` does for an upload; refused beyond the size limit (`check_size`)."""
    if np.dtype(dtype).name not in SUPPORTED_DTYPES and np.dtype(dtype) != bool:
        raise DinofeatError(f"{name} has samples of type {np.dtype(dtype)}, which is not supported; use 8- or 16-bit integers or floats.")
    shape = list(shape)
    while len(shape) > 2 and 1 in shape:
        shape.remove(1)
    axes = image_axes(np.broadcast_to(np.uint8(0), tuple(shape)))  # the axes of the shape, without any samples
    if axes.endswith("c"):
        shape[-1] = 3
    volume = axes.startswith("z")
    stack = tuple(shape) if volume else (1, *shape)
    check_size(stack, name)
    return stack, volume


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
            stored = hdf5_dataset(f, path, dataset)
            shape, dtype = stored.shape, stored.dtype
    except OSError as error:
        raise DinofeatError(f"cannot read {path}: not an HDF5 file ({error}).") from None
    stack, volume = checked_shape(tuple(shape), dtype, f"{path}/{dataset}")
    if volume and len(stack) != len(shape):
        raise DinofeatError(f"{path}/{dataset} has shape {tuple(shape)}; store the volume as (Z, Y, X) or (Z, Y, X, 3).")
    return VolumeSource("hdf5", path, stack, np.dtype(dtype).name, volume, dataset=dataset)


def hdf5_dataset(f, path: str, dataset: str):
    """The dataset `dataset` of the open file `f` (named `path`), refused unless all its samples are in this file: no
    external or soft link on its way out of the file, no external storage, no virtual sources in other files."""
    import h5py

    stored = f.get(inside_hdf5(f, path, dataset))
    if not isinstance(stored, h5py.Dataset):
        raise DinofeatError(f"{path} has no dataset {dataset!r}.")
    if stored.external or (stored.is_virtual and any(source.file_name != "." for source in stored.virtual_sources())):
        raise DinofeatError(f"{path}/{dataset} keeps its samples in other files (external storage or a virtual dataset), "
                            "which dinofeat does not follow; copy the data into the file (h5repack, or h5py) and give that.")
    return stored


def inside_hdf5(f, path: str, dataset: str) -> str:
    """The object path that `dataset` leads to inside the open file `f`, following soft links within the file;
    an external link (also behind soft links) or a chain of more than MAX_LINK_HOPS soft links is refused."""
    import h5py

    current, pending, hops = "/", [part for part in dataset.split("/") if part], 0
    while pending:
        name = posixpath.join(current, pending.pop(0))
        link = f.get(name, getlink=True)
        if link is None:
            raise DinofeatError(f"{path} has no dataset {dataset!r}.")
        if isinstance(link, h5py.ExternalLink) or hops > MAX_LINK_HOPS:
            raise DinofeatError(f"{path}/{dataset} is a link to {getattr(link, 'filename', 'a chain of links')}, outside the "
                                "file, which dinofeat does not follow; give the dataset in the file that holds it.")
        if isinstance(link, h5py.SoftLink):  # restart from the root with the link's target before what is left
            hops += 1
            target = posixpath.normpath(posixpath.join(current, link.path))
            current, pending = "/", [part for part in target.split("/") if part] + pending
        else:
            current = name
    return current


def zarr_source(path: str) -> VolumeSource:
    """The full-resolution level of an OME-Zarr image (its multiscales metadata), or a plain Zarr array; a URL's host
    must pass $DINOFEAT_HTTP_HOSTS, every dataset path must stay inside the store, and the size `check_size`."""
    import zarr

    hosts = HostAllowance.from_environment() if is_url(path) else HostAllowance()
    if is_http(path):
        hosts.check_url(path)
    try:
        node = zarr.open(path, mode="r", **storage_options(path, hosts))
        if isinstance(node, zarr.Array):
            array_path, axes, stored = "", "zyx"[-node.ndim:] if node.ndim <= 3 else "", node
        else:
            paths, axes = image_metadata(dict(node.attrs), path)
            for dataset in paths:
                check_inside_store(path, dataset)
            array_path = paths[0]
            stored = zarr_array(path, array_path, hosts)
            axes = axes or "tczyx"[-stored.ndim:]
    except Exception as error:  # readers and their transports raise many types; the user needs one sentence
        raise zarr_refusal(path, error) from None
    shape = zarr_shape(path, stored.shape, axes)
    check_size(shape, path)
    if stored.dtype.name not in SUPPORTED_DTYPES:
        raise DinofeatError(f"{path} has samples of type {stored.dtype}, which is not supported; use 8- or 16-bit integers or floats.")
    return VolumeSource("zarr", path, shape, stored.dtype.name, "z" in axes and shape[0] > 1, dataset=array_path, axes=axes,
                        hosts=hosts)


def storage_options(path: str, hosts: HostAllowance) -> dict:
    """zarr.open's keywords for `path`: an http(s) store read through a session bound to `hosts`, nothing for others."""
    options = hosts.storage_options(path)
    return {"storage_options": options} if options else {}


def zarr_refusal(path: str, error: Exception) -> DinofeatError:
    """The sentence for a failure to open a Zarr store: ours as is (from anywhere in the chain), else what it means."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, DinofeatError):
            return cause
        if isinstance(cause, ImportError):  # fsspec's protocol packages: s3fs, gcsfs, ...
            return DinofeatError(f"cannot read {path}: {cause}")
        if isinstance(cause, (UnicodeDecodeError, ValueError)) and "JSON" in f"{type(cause).__name__} {cause}":
            return DinofeatError(f"cannot read {path}: its Zarr metadata is not valid JSON; fix or rewrite the store.")
        cause = cause.__cause__ or cause.__context__
    what = "an OME-Zarr at that URL" if is_url(path) else "a Zarr folder"
    return DinofeatError(f"cannot read {path}: not {what} ({type(error).__name__}).")


def image_metadata(attrs: dict, path: str) -> tuple[list[str], str]:
    """(every dataset path, the axis letters or "") of the first image in an OME-Zarr group's multiscales (NGFF 0.4 in
    the attributes, 0.5 under "ome"); malformed metadata (wrong types, missing keys) is one sentence."""
    ome = attrs.get("ome")
    multiscales = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict) else None)
    if not multiscales:
        raise DinofeatError(f"{path} is a Zarr group without OME-Zarr multiscales metadata; give an OME-Zarr image.")
    image = multiscales[0] if isinstance(multiscales, list) else None
    datasets = image.get("datasets") if isinstance(image, dict) else None
    axes = image.get("axes", []) if isinstance(image, dict) else None
    names = [axis.get("name") if isinstance(axis, dict) else axis for axis in axes] if isinstance(axes, list) else [None]
    if (not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets)
            or not all(isinstance(name, str) for name in names)):
        raise DinofeatError(f"{path} has malformed OME-Zarr metadata (multiscales[0] needs a list of datasets, each with a "
                            "path, and axes named by letters); write the store again with an OME-Zarr writer.")
    return [d["path"] for d in datasets], "".join(names)


def check_inside_store(store: str, dataset: str) -> None:
    """Refuse a dataset path that leaves its store: absolute, with a scheme, `..` or `.` parts, backslashes, or (in a
    folder) resolving through a symbolic link to somewhere outside it."""
    parts = dataset.split("/")
    escapes = dataset.startswith("/") or "\\" in dataset or ":" in dataset or any(part in (".", "..") for part in parts)
    if not escapes and dataset and not is_url(store):
        root = Path(store).resolve()
        escapes = not (root / dataset).resolve().is_relative_to(root)
    if escapes:
        raise DinofeatError(f"{store} names its image data {dataset!r}, a path outside the store; an OME-Zarr's dataset "
                            "paths must lead inside it (such as \"0\"), so give an image whose data it holds.")


def zarr_array(path: str, dataset: str, hosts: HostAllowance):
    """The array `dataset` of the store at `path` (the store itself for ""), opened through the store so that it stays
    inside it, over a session bound to `hosts` for a URL."""
    import zarr

    check_inside_store(path, dataset)
    if not dataset:
        return zarr.open_array(path, mode="r", **storage_options(path, hosts))
    stored = zarr.open_group(path, mode="r", **storage_options(path, hosts))[dataset]
    if not isinstance(stored, zarr.Array):
        raise DinofeatError(f"{path}/{dataset} is a group, not an array; give an OME-Zarr image whose datasets are arrays.")
    return stored


def zarr_shape(path: str, stored_shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """(Z, Y, X[, 3]) of a stored OME-Zarr array with axes `axes`; axes, time points and channels dinofeat cannot read
    are one sentence."""
    if not axes or set(axes) - set("tczyx") or len(axes) != len(stored_shape) or not {"y", "x"} <= set(axes):
        raise DinofeatError(f"{path} has axes {axes or tuple(stored_shape)!r}; dinofeat reads t, c, z, y and x.")
    sizes = dict(zip(axes, stored_shape))
    if sizes.get("t", 1) != 1 or sizes.get("c", 1) not in (1, 3, 4):
        raise DinofeatError(f"{path} has {sizes.get('t', 1)} time points and {sizes.get('c', 1)} channels; dinofeat reads one "
                            "time point of a greyscale or RGB image.")
    colour = (3,) if sizes.get("c", 1) in (3, 4) else ()
    return (sizes.get("z", 1), sizes["y"], sizes["x"], *colour)
