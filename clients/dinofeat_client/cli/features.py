"""`dinofeat features`: a feature stack into HDF5 (or OME-Zarr, see volumes.py)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..client import Transfer
from ..imagej_tiff import write_imagej_hyperstack
from ..images import check_image, read_image
from ..outputs import output_file, remove_quietly
from ..spaces import read_space
from .common import connect, deep_options, output_format
from .progress import ProgressBars
from .volumes import wants_zarr, zarr_features


def hidden_features_path(output: str) -> Path:
    """Where features go before they become another file (kept there if the stream breaks, for a resume)."""
    output = Path(output)
    return output.absolute().parent / f".{output.name}.features.h5"


def fetch(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, path: str | Path, **encoding) -> Transfer:
    """The features of `image` (--set and the deep options) from the server into `path`."""
    like = read_space(args.like) if getattr(args, "like", None) else None
    with connect(args) as client:
        transfer = client.fetch_features(image, path, args.set, progress=bars, **encoding, **deep_options(args), like=like)
    bars.close()
    return transfer


@contextlib.contextmanager
def hidden_features(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, output: str,
                    **encoding) -> Iterator[Transfer]:
    """Features fetched into a hidden .h5 beside `output` for the caller to turn into another file; removed after."""
    transfer = fetch(args, image, bars, hidden_features_path(output), **encoding)
    try:
        yield transfer
    finally:
        remove_quietly(transfer.path)


def command_features(args: argparse.Namespace, bars: ProgressBars) -> None:
    if wants_zarr(args):
        return zarr_features(args, bars)
    image = check_image(read_image(args.image))
    output_file(args.output)
    encoding = {"compression": args.compression, "level": args.level}
    if output_format(args) == "tiff":
        with hidden_features(args, image, bars, args.output, **encoding) as transfer, h5py.File(transfer.path, "r") as f:
            written = write_imagej_hyperstack(f["features"], args.output)
    else:
        transfer = fetch(args, image, bars, args.output, **encoding)
        written = transfer.path
    resumed = "" if transfer.chunks_received == transfer.chunk_count else f" (resumed: {transfer.chunks_received} of {transfer.chunk_count} chunks fetched now)"
    print(f"wrote {written}{resumed}")
