"""What many commands share: the connection (--server, the local server or an embedded one), deep options, output names."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.computation import DEEP_SETS, FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import output_file, remove_quietly
from dinofeat.contract.tokens import read_tokens

from .. import local_server
from ..batch import BatchReport
from ..client import PLAINTEXT_TOKEN_VARIABLE, FeatureClient
from ..server_part import embedded_server
from .progress import say


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[FeatureClient]:
    """A client for --server; else for this user's local server (local_server.py: started once, it keeps torch and
    models loaded between commands), or with --no-local-server for an embedded server started here (needs dinofeat[server])."""
    if args.server:
        local_files = [flag for flag, given in (("--weights", args.weights), ("--upsampler-weights", args.upsampler_weights)) if given]
        if local_files:
            raise DinofeatError(f"{' and '.join(local_files)} {'names a file' if len(local_files) == 1 else 'name files'} on this "
                                "machine, but --server computes elsewhere; give the weights to that server "
                                "(dinofeat serve --weights ...).")
        token = read_tokens(args.token_file)[0] if args.token_file else os.environ.get("DINOFEAT_TOKEN")
        insecure_token = args.insecure_token or os.environ.get(PLAINTEXT_TOKEN_VARIABLE, "").lower() in ("1", "true", "yes", "on")
        with FeatureClient(args.server, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           retries=args.retries, notify=say, insecure_token=insecure_token) as client:
            yield client
        return
    weights = backbone_weights(args)
    address = local_server.local_address(args.device, weights, notify=say) if local_server.wanted(args.no_local_server) else None
    if address:
        with FeatureClient(address, notify=say) as client:
            yield client
        return
    with embedded_server(args.device, weights) as address, FeatureClient(address, notify=say) as client:
        yield client


SUFFIXES = {"h5": (".h5", ".hdf5", ".hdf"), "tiff": (".tif", ".tiff"), "png": (".png",)}
"""What each output format's files are called; an output named otherwise is refused, never mislabelled."""


def checked_suffix(output: str, formats: tuple[str, ...], command: str) -> str:
    """The format an output's suffix names, among `formats`; anything else gets one sentence."""
    suffix = Path(output).suffix.lower()
    for name in formats:
        if suffix in SUFFIXES[name]:
            return name
    names = " or ".join(SUFFIXES[name][0] for name in formats)
    raise DinofeatError(f"dinofeat {command} writes {names} files, not {suffix or 'files without a suffix'!r}; "
                        f"name the output {Path(output).stem}{SUFFIXES[formats[0]][0]}.")


def output_format(args: argparse.Namespace) -> str:
    """--format when it agrees with the output's suffix, else what the suffix says (.h5: HDF5, .tif: an
    ImageJ hyperstack)."""
    named = checked_suffix(args.output, ("h5", "tiff"), "features")
    if args.format and args.format != named:
        raise DinofeatError(f"--format {args.format} does not match the output name {args.output}; "
                            f"name it {Path(args.output).stem}{SUFFIXES[args.format][0]}.")
    return named


def check_outputs(*paths: str | None) -> None:
    """Refuse, before any upload, outputs that cannot be written (outputs.output_file; their folders are created)."""
    for path in paths:
        if path:
            output_file(path)


def finish_batch(report: BatchReport, total: int, then: Callable[[], None] = lambda: None) -> None:
    """Print the batch's summary (and what `then` prints); any failure makes the command fail (exit status 1)."""
    print(report.summary())
    then()
    if report.failed:
        raise DinofeatError(f"{len(report.failed)} of {total} images failed (see above).")


def take_dataset(path: Path, name: str) -> np.ndarray:
    """Read a whole dataset from a temporary result file, then remove the file."""
    try:
        with h5py.File(path, "r") as f:
            return f[name][()]
    finally:
        remove_quietly(path)


def backbone_weights(args: argparse.Namespace) -> dict[str, str] | None:
    """--weights as {backbone: file} for the computing side (None without it): --backbone's, else "*", whichever backbone
    the computation names (the default, or a DINOv3 one stored in the file, model or project the command adopts)."""
    weights, anyup = args.weights, args.upsampler_weights
    mapping = ({args.backbone or "*": weights} if weights else {}) | ({"anyup": anyup} if anyup else {})
    return mapping or None  # --upsampler-weights as {"anyup": file}


DEEP_ONLY = ("backbone", "preset", "weights", "upsampler")
"""Options that only the deep sets take (--pca is checked by the description itself)."""
GIVEN = {"feature_set": "set", "backbone": "backbone", "preset": "preset", "pca": "pca", "normalise": "normalise",
         "input_range": "input_range", "upsampler": "upsampler"}
"""The description's fields and the command-line arguments that give them (absent or None: not given)."""


def computation_from_args(args: argparse.Namespace, stored: FeatureComputation | None = None, source: str = "") -> FeatureComputation:
    """The command's feature computation: the options given, else the one `stored` in `source` (a feature file or
    model the command adopts), else the defaults (--set's is the command's own, see options.set_option). A given option that conflicts with the stored description, or that
    does not apply to the set, gets one sentence naming both values as the user types them."""
    given = {name: vars(args)[attribute] for name, attribute in GIVEN.items() if vars(args)[attribute] is not None}
    if stored is not None:
        conflicts = stored.differences(replace(stored, **given))
        if conflicts:
            was, asked = conflicts[0].split(", not ")
            raise DinofeatError(f"{source} was computed with {was}, but this command asks for {asked}; leave that option out "
                                "to use the stored computation, or leave out the stored file to fit a new one.")
        computation = replace(stored, **given)
    else:
        computation = FeatureComputation(**{"feature_set": args.default_set, **given})
    if not computation.deep:
        for name in DEEP_ONLY:
            if vars(args)[name] is not None:
                raise DinofeatError(f"--{name} applies to the deep sets ({', '.join(DEEP_SETS)}); the {computation.feature_set} "
                                    f"set is a filter bank: leave --{name} out, or choose a deep set with --set.")
    return computation.checked()


def weights_map(entries: list[str]) -> dict[str, str]:
    """`--weights NAME=PATH` for one backbone, `--weights PATH` for any backbone without its own."""
    mapping = {}
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        mapping[name] = path
    return mapping
