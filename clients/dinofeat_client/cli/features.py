"""`dinofeat features`: a feature stack into HDF5 (or OME-Zarr, see volumes.py)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.images import check_image
from dinofeat.contract.outputs import output_file, remove_quietly

from ..client import Transfer
from ..imagej_tiff import write_imagej_hyperstack
from ..image_files import read_image
from ..spaces import read_stored
from .common import computation_from_args, connect, output_format
from .progress import ProgressBars
from .volumes import wants_zarr, zarr_features
from .options import SharedOptions, set_option


def hidden_features_path(output: str) -> Path:
    """Where features go before they become another file (kept there if the stream breaks, for a resume)."""
    output = Path(output)
    return output.absolute().parent / f".{output.name}.features.h5"


def requested_computation(args: argparse.Namespace) -> tuple[FeatureComputation, str | None]:
    """The command's feature computation and the feature space it is expressed in: both adopted from --like's file
    (its options conflicting with the stored ones refused in one sentence), else the options and one fitted here."""
    if not args.like:
        return computation_from_args(args), None
    stored = read_stored(args.like)
    return computation_from_args(args, stored.computation, args.like_source or f"--like {args.like}"), stored.space_json


def fetch(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, path: str | Path, **encoding) -> Transfer:
    """The features of `image` (the command's computation, see requested_computation) from the server into `path`."""
    computation, like = requested_computation(args)
    with connect(args) as client:
        transfer = client.fetch_features(image, path, computation, progress=bars, **encoding, like=like)
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


def add_parsers(commands: argparse._SubParsersAction, shared: SharedOptions) -> None:
    """The features command."""
    p = commands.add_parser("features", parents=[shared.remote, shared.deep, shared.dask],
                            help="compute a feature stack and write it as HDF5")
    p.set_defaults(run=command_features)
    p.add_argument("image", help="TIFF (2-D, RGB or stack; 8/16-bit or float), PNG or JPEG")
    p.add_argument("-o", "--output", required=True, help="the file to write: .h5, .tif for an ImageJ hyperstack, or .zarr for "
                   "OME-Zarr (computed here or with --dask; needs dinofeat[server,volumes])")
    p.add_argument("--format", choices=("h5", "tiff"), help="h5 (HDF5) or tiff (ImageJ hyperstack, channels labelled); "
                   "the output's suffix names it (.h5 / .tif), and must agree with this")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .zarr output that dinofeat did not write")
    set_option(p)
    p.add_argument("--like", metavar="FILE", help="compute the features in the feature space of an earlier feature file (.h5 "
                   "or a .zarr store dinofeat wrote) or model (.dfm), so they compare with it (default: fit a space on this image)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip", help="HDF5 chunk compression (default gzip)")
    p.add_argument("--level", type=int, default=1, choices=range(1, 10), metavar="1-9", help="gzip level (default 1)")
