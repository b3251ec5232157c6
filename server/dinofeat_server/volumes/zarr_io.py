"""Feature stacks as OME-Zarr (NGFF 0.4 on Zarr v2): what Fiji (n5-zarr, MoBIE, BigDataViewer) and napari open.

Layout of `OUT.zarr` (a folder):
    .zattrs      "multiscales" (NGFF 0.4: axes c, z, y, x, or c, y, x for a 2-D image, one level "0" at scale 1),
                 "omero" (one channel per feature, its "label" the channel name: what viewers show),
                 "dinofeat" (what an HDF5 feature file's attributes hold: channel_names, feature_set, backbone,
                 weights_sha256, feature_space as JSON, dinofeat_version, source, source_shape, source_dtype,
                 and "complete": true once every slice is written)
    0/           the features, float32, (C, Z, Y, X) or (C, Y, X): the axis order of the HDF5 output.

Chunks are (1, 1, 256, 256) (or (1, 256, 256)), the HDF5 output's chunks: the engine yields blocks on
256 x 256 bounds and one task writes one slice, so a task writes only whole chunks of its own and no two
tasks ever touch one chunk. Compression: zlib level 1 (Fiji's Java Zarr readers decode zlib without a
native library; blosc needs one). A store is built under a hidden name beside the output and renamed to
it when complete, so a half-written store never carries the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import CHUNK_EDGE

from ..engine.space import FeatureSpace

LEVEL = "0"
"""The path of the full-resolution array inside the group."""
ZARR_SUFFIX = ".zarr"


def chunks_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One channel (and one slice) by a 256 x 256 tile: (1, 1, 256, 256) or (1, 256, 256), clipped to the shape."""
    return (1,) * (len(shape) - 2) + tuple(min(CHUNK_EDGE, s) for s in shape[-2:])


def axes_of(volume: bool) -> list[dict]:
    spatial = ["z", "y", "x"] if volume else ["y", "x"]
    return [{"name": "c", "type": "channel"}] + [{"name": name, "type": "space"} for name in spatial]


def is_feature_store(path: Path) -> bool:
    """Whether `path` is an OME-Zarr store that dinofeat wrote (features, labels or probabilities; complete or not)."""
    attrs = path / ".zattrs"
    try:
        return "dinofeat" in json.loads(attrs.read_text())
    except (OSError, ValueError, TypeError):
        return False


def checked_output(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output store's path: named .zarr; when it exists, a store dinofeat wrote or an empty folder is
    replaced, anything else only with `overwrite`. Its folder is created and must take new files."""
    from dinofeat.contract.outputs import output_folder

    path = Path(output)
    if path.suffix.lower() != ZARR_SUFFIX:
        raise DinofeatError(f"OME-Zarr outputs are folders named .zarr, not {path.name!r}; name the output {path.stem}.zarr.")
    if path.exists() and not overwrite:
        empty = path.is_dir() and not any(path.iterdir())
        if not empty and not (path.is_dir() and is_feature_store(path)):
            what = "a folder that dinofeat did not write" if path.is_dir() else "a file"
            raise DinofeatError(f"the output {path} exists and is {what}; choose another name, or pass --overwrite to replace it.")
    output_folder(path.absolute().parent)
    return path


def partial_path(output: Path) -> Path:
    """Where the store is built before it takes the output's name (beside it, so the rename stays on one file system)."""
    return output.absolute().parent / f".{output.name}.partial"


def new_group(path: Path):
    """An empty Zarr v2 group at `path` (whatever was there removed)."""
    import zarr

    if path.exists():
        shutil.rmtree(path)
    return zarr.open_group(str(path), mode="w", zarr_format=2)


def add_array(group, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """An empty array (no chunks yet) of tile-sized chunks (`chunks_of`), zlib level 1, "/"-separated chunk keys."""
    import numcodecs

    group.create_array(name, shape=shape, chunks=chunks_of(shape), dtype=dtype, fill_value=0,
                       compressors=numcodecs.Zlib(level=1), chunk_key_encoding={"name": "v2", "separator": "/"})


def write_ngff(group, name: str, shapes: list[tuple[int, ...]], channel: bool, metadata: dict) -> None:
    """NGFF 0.4 "multiscales" of the arrays "0", "1", ... of `shapes` (level k at scale 2^k in Y and X), with
    `metadata` ("omero": beside it in the group's attributes)."""
    from ome_zarr.format import FormatV04

    with warnings.catch_warnings():  # ome_zarr.writer's import warns of its own deprecated Scaler, which we do not use
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata

    datasets = []
    for level, shape in enumerate(shapes):
        factor = float(2**level)
        scale = [1.0] * (len(shape) - 2) + [factor, factor]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    volume = len(shapes[0]) - channel == 3
    axes = axes_of(volume)[0 if channel else 1 :]  # a label image has no channel axis
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes, name=name, metadata=metadata)


def create_feature_store(path: Path, shape: tuple[int, ...], channel_names: list[str], attributes: dict,
                         name: str = "features") -> None:
    """An empty store (no chunks yet) for float32 features of `shape` (C, Z, Y, X) or (C, Y, X), with its metadata
    (the NGFF image's `name`: "features", or "probabilities" for a classifier's)."""
    group = new_group(path)
    add_array(group, LEVEL, shape, "float32")
    channels = [{"label": label, "color": "FFFFFF", "active": i == 0,
                 "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}} for i, label in enumerate(channel_names)]
    write_ngff(group, name, [shape], True, {"omero": {"channels": channels}})
    group.attrs["dinofeat"] = {**attributes, "complete": False}


def pyramid_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """The shapes of the full-resolution level and `levels` more, each half the last in Y and X (rounded up)."""
    shapes = [tuple(shape)]
    for _ in range(levels):
        *rest, rows, columns = shapes[-1]
        shapes.append((*rest, -(-rows // 2), -(-columns // 2)))
    return shapes


LABEL_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
"""Colours of the classes in ascending value (as the overlay pictures' legend), repeated past ten."""


def parent_image(source_kind: str, source_path: str, source_dataset: str, output: Path) -> str | None:
    """The NGFF "image-label" "source" of a label image written to `output`: the relative path from it to the OME-Zarr
    image it labels, so readers (ome-zarr, napari) show the labels over their image; None when the input is no
    local OME-Zarr image (TIFF, HDF5, a bare Zarr array, an http store), which an NGFF label cannot point to."""
    if source_kind != "zarr" or not source_dataset or "://" in source_path:
        return None
    return os.path.relpath(Path(source_path).absolute(), output.absolute())


def create_label_store(path: Path, shape: tuple[int, ...], dtype: str, class_values: list[int], levels: int,
                       attributes: dict, parent: str | None = None) -> None:
    """An empty NGFF 0.4 label image of class values (Z, Y, X) or (Y, X) of `dtype`, with `levels` downsampled levels
    ("1", "2", ...): "multiscales" and "image-label" (a colour and the name class_V for each class, and the relative
    path of the `parent` image it labels as its "source", when there is one) in its .zattrs."""
    group = new_group(path)
    shapes = pyramid_shapes(shape, levels)
    for level, level_shape in enumerate(shapes):
        add_array(group, str(level), level_shape, dtype)
    colours = [{"label-value": int(v), "rgba": [*LABEL_COLOURS[i % len(LABEL_COLOURS)], 255]} for i, v in enumerate(class_values)]
    properties = [{"label-value": int(v), "class": f"class_{v}"} for v in class_values]
    write_ngff(group, "labels", shapes, False, {})
    source = {"source": {"image": parent}} if parent else {}
    group.attrs["image-label"] = {"version": "0.4", "colors": colours, "properties": properties, **source}
    group.attrs["dinofeat"] = {**attributes, "complete": False}


def label_dtype(class_values: list[int]) -> str:
    """The smallest integer type holding every class value (unsigned unless a value is negative)."""
    return np.result_type(np.min_scalar_type(min(class_values)), np.min_scalar_type(max(class_values))).name


def halved(class_map: np.ndarray) -> np.ndarray:
    """A (Y, X) class map at half size (rounded up) by the mode of each 2 x 2 block (ties: the first of the block in
    reading order; an odd edge repeats its last row or column), so no class value is invented."""
    rows, columns = class_map.shape
    padded = np.pad(class_map, ((0, rows % 2), (0, columns % 2)), mode="edge")
    block = np.stack([padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]])
    votes = (block[:, None] == block[None, :]).sum(axis=1)  # for each of the 4 pixels, how many of the 4 equal it
    return np.take_along_axis(block, votes.argmax(axis=0)[None], axis=0)[0]


def write_labels(path: Path, z: int | None, class_map: np.ndarray, levels: int) -> None:
    """Write slice z's (Y, X) class map into the full-resolution level, then each downsampled level from the one before:
    a slice's task writes all (and only) the chunks of its own slice in every level."""
    for level in range(levels + 1):
        array = open_level(path, str(level))
        array[(z, slice(None), slice(None)) if z is not None else (slice(None), slice(None))] = class_map
        class_map = halved(class_map)


def open_level(path: Path, level: str = LEVEL):
    """An array of a store (the full-resolution one unless `level` names another), for writing."""
    import zarr

    return zarr.open_array(str(path / level), mode="r+", zarr_format=2)


def write_block(array, z: int | None, y0: int, x0: int, block: np.ndarray) -> None:
    """Write a (C, rows, columns) block of slice z (None: a 2-D image) at (y0, x0) into `open_level`'s array: whole
    chunks only, when blocks lie on 256 x 256 bounds, as the engine's do."""
    window = (slice(y0, y0 + block.shape[1]), slice(x0, x0 + block.shape[2]))
    array[(slice(None), z, *window) if z is not None else (slice(None), *window)] = block


def finish_store(partial: Path, output: Path) -> Path:
    """Mark the store complete and give it the output's name, replacing what was there (checked_output allowed it)."""
    import zarr

    group = zarr.open_group(str(partial), mode="r+", zarr_format=2)
    group.attrs["dinofeat"] = {**group.attrs["dinofeat"], "complete": True}
    if output.exists() or output.is_symlink():
        old = output.absolute().parent / f".{output.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        output.rename(old)
        partial.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        partial.rename(output)
    return output


def open_features(path: str | os.PathLike) -> tuple[object, list[str], FeatureSpace]:
    """(the zarr array (C, Z, Y, X) or (C, Y, X), channel names, feature space) of a complete feature store."""
    import zarr

    path = Path(path)
    if not is_feature_store(path):
        raise DinofeatError(f"{path} is not a dinofeat OME-Zarr feature store.")
    group = zarr.open_group(str(path), mode="r")
    meta = group.attrs["dinofeat"]
    if not isinstance(meta, dict) or not meta.get("complete"):
        raise DinofeatError(f"{path} is incomplete (its computation stopped); compute the features again.")
    try:
        names = meta["channel_names"]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise TypeError("channel_names")
        space = FeatureSpace.from_dict(meta["feature_space"])
    except (KeyError, TypeError, ValueError, AttributeError):  # edited or truncated attributes
        raise DinofeatError(f"{path} has malformed dinofeat metadata (its channel names or feature space are missing or "
                            "of the wrong type); compute the features again.") from None
    return group[LEVEL], names, space
