"""napari reader for OME-Zarr folders: the image's levels as dask arrays, so a volume opens lazily as one
multiscale layer (napari reads the slices it shows; the widget sends one slice at a time). Needs ome-zarr."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def zarr_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """read_ome_zarr for a folder named *.zarr when ome-zarr is installed, else None (napari asks other readers)."""
    if not isinstance(path, str) or not path.rstrip("/").lower().endswith(".zarr"):
        return None
    try:
        import ome_zarr.reader  # noqa: F401
    except ImportError:
        return None
    return read_ome_zarr


def read_ome_zarr(path: str) -> list[tuple]:
    """The first image of an OME-Zarr folder as napari layer data: its pyramid levels, lazy (dask)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(path)
    if location is None:
        return []
    node = next(iter(Reader(location)()))
    return [(list(node.data), {"name": Path(path.rstrip("/")).stem, "multiscale": True}, "image")]
