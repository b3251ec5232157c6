"""The options several commands share, as parent parsers, and the defaults every command's namespace has.

Each command module adds its own commands (`add_parsers(commands, shared)`), with their arguments beside their
bodies; what more than one command takes is built here once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dinofeat.contract.computation import (
    DEFAULT_BACKBONE,
    DEFAULT_PRESET,
    DEFAULT_SET,
    INPUT_RANGES,
    NORMALISATIONS,
    PRESETS,
    UPSAMPLERS,
)
from dinofeat.contract.wire import CLASSIFIERS, DEFAULT_CLASSIFIER

from ..client import PLAINTEXT_TOKEN_FLAG, PLAINTEXT_TOKEN_VARIABLE

NAMESPACE_DEFAULTS = dict(quiet=False, ends_at_once=False, server=None, no_local_server=False, weights=None,
                          upsampler_weights=None, backbone=None, preset=None, upsampler=None, pca=None, normalise=None,
                          input_range=None, set=None, like=None, like_source=None, default_set=DEFAULT_SET)
"""What a command that has no such option reads: the shared code (connect, computation_from_args, main) reads
these attributes of every command's namespace."""


def remote_options() -> argparse.ArgumentParser:
    """How a command reaches its server: --server with token and TLS, or this user's local or an embedded one."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="ADDRESS", help="host:port of a dinofeat server (default: start one in this process)")
    remote.add_argument("--device", default="auto", help="device of the local or embedded server: auto, cpu, cuda[:N] (default: auto)")
    remote.add_argument("--no-local-server", action="store_true", help="compute in this process instead of in this user's local "
                        "server, which stays loaded between commands (also DINOFEAT_LOCAL_SERVER=0)")
    remote.add_argument("--quiet", action="store_true", help="no progress bars")
    remote.add_argument("--token-file", help="file with the server's access token (default: $DINOFEAT_TOKEN)")
    remote.add_argument("--tls-ca", help="CA certificate that signed the server's TLS certificate (turns TLS on)")
    remote.add_argument("--tls-cert", help="client certificate, for servers that require one")
    remote.add_argument("--tls-key", help="client certificate's key")
    remote.add_argument(PLAINTEXT_TOKEN_FLAG, action="store_true",
                        help="send the access token even without TLS to a server on another machine, where anyone on the way "
                             f"can read it (default: refused; use --tls-ca; also ${PLAINTEXT_TOKEN_VARIABLE}=1)")
    remote.add_argument("--retries", type=int, default=5, metavar="N",
                        help="times to try again when the server is unavailable, pausing 0.5 s, 1 s, 2 s, ... (default 5)")
    return remote


def computation_options(pca_help: str) -> argparse.ArgumentParser:
    """The options of a feature computation beside --set (backbone, preset, PCA, normalisation, input range, weights);
    left out, each comes from the file the command adopts (--like, a model) or its default."""
    deep = argparse.ArgumentParser(add_help=False)
    deep.add_argument("--backbone", help=f"backbone of the deep sets: dinov2_vit{{s,b,l,g}}14[_reg] or dinov3_vit{{s16,s16plus,b16,l16,"
                      f"h16plus,7b16}} (default {DEFAULT_BACKBONE}; DINOv3 only with --weights, see README)")
    deep.add_argument("--preset", choices=PRESETS, help=f"views of the deep sets: {', '.join(PRESETS)} (default {DEFAULT_PRESET}; "
                      "paper and paper_flips reproduce the paper's pipeline, its input scaling included)")
    deep.add_argument("--upsampler", choices=UPSAMPLERS, help="how the deep tokens reach full resolution instead of the "
                      "preset's own (fast: joint_bilateral, default: bilinear): anyup is AnyUp, a learned upsampler "
                      "(Wimmer et al. 2026, CC-BY-4.0), whose weights the server downloads once (see README)")
    deep.add_argument("--upsampler-weights", metavar="FILE", help="AnyUp's weights file, e.g. anyup_multi_backbone.pth "
                      "(embedded server only; default: the authors' release, downloaded once)")
    deep.add_argument("--pca", type=int, help=pca_help)
    deep.add_argument("--normalise", choices=NORMALISATIONS,
                      help="per-channel minmax or zscore, per-pixel l2, in the dataset's feature space (default none; "
                           "hybrid is always minmax)")
    deep.add_argument("--input-range", choices=INPUT_RANGES,
                      help="how intensities become the input: dtype (8-bit / 255, 16-bit / 65535, floats as they are) or "
                           "dataset (its 0.1-99.9 percentiles become 0 and 1); default dtype for the filter banks and the "
                           "paper presets, dataset for the other deep presets")
    deep.add_argument("--weights", help="weights file for the backbone (embedded server only; default: DINOv2's official "
                      "download; DINOv3 needs one)")
    return deep


NEEDS_WEIGHTS = ("; it needs DINOv2 weights, downloaded once, or --weights FILE; offline, `dinofeat weights random "
                 "BACKBONE -o FILE.pth` writes a checkpoint that runs but means nothing, and --set multiscale needs none")
"""What the help of a command whose default set is deep adds to --set."""


def set_option(parser: argparse.ArgumentParser, default: str = DEFAULT_SET, why: str = "") -> None:
    """--set, whose default (applied with the stored computation, see common.computation_from_args) the help states."""
    parser.add_argument("--set", help=f"feature set (see `dinofeat sets`; default {default}{why})")
    parser.set_defaults(default_set=default)


def dask_options() -> argparse.ArgumentParser:
    """Where a volume's tasks run (--dask) and how to reach a TLS scheduler; for commands that write OME-Zarr."""
    dask = argparse.ArgumentParser(add_help=False)
    dask.add_argument("--dask", metavar="ADDRESS", help="compute a volume (TIFF stack, OME-Zarr or HDF5 on storage the workers "
                      "share) as Dask tasks on the scheduler at ADDRESS (tcp://HOST:8786, tls://...), or 'local' for a "
                      "local cluster; writes -o OUT.zarr")
    dask.add_argument("--dask-workers", type=int, default=0, metavar="N", help="workers of --dask local, one thread each "
                      "(default: one per CPU core)")
    dask.add_argument("--dask-tls-ca", metavar="PEM", help="for a tls:// scheduler: the CA that signed its certificate")
    dask.add_argument("--dask-tls-cert", metavar="PEM", help="for a tls:// scheduler: this client's certificate")
    dask.add_argument("--dask-tls-key", metavar="PEM", help="for a tls:// scheduler: this client's key")
    return dask



@dataclass(frozen=True)
class SharedOptions:
    """The parent parsers of the commands: where they compute (remote), what (deep: the computation's options
    beside --set), on a volume (dask, pyramid), with which classifier, and their pictures and batch outputs."""

    remote: argparse.ArgumentParser
    deep: argparse.ArgumentParser
    dask: argparse.ArgumentParser
    classifier: argparse.ArgumentParser
    pictures: argparse.ArgumentParser
    batch: argparse.ArgumentParser
    pyramid: argparse.ArgumentParser

    @classmethod
    def build(cls) -> SharedOptions:
        classifier = argparse.ArgumentParser(add_help=False)
        classifier.add_argument("--classifier", choices=CLASSIFIERS, default=DEFAULT_CLASSIFIER,
                                help="extra_trees (default: a forest of extremely randomised trees), random_forest (Weka-like), "
                                     "logistic (the paper's for deep features) or gradient_boosting")
        classifier.add_argument("--trees", type=int, default=0, help="trees of the forest (default 200)")
        classifier.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        pictures = argparse.ArgumentParser(add_help=False)
        pictures.add_argument("--pictures", action="store_true", help="also write PNG pictures next to the outputs")
        batch = argparse.ArgumentParser(add_help=False)
        batch.add_argument("--overwrite", action="store_true", help="replace outputs that exist in the output folder, and remove "
                           "the files an earlier run wrote for the same image that this run does not (probabilities, pictures) "
                           "(default: skip those images)")

        pyramid = argparse.ArgumentParser(add_help=False)
        pyramid.add_argument("--pyramid", type=int, default=0, metavar="N", help="with -o OUT.zarr: N more levels of the label "
                             "image, each half the last in Y and X (mode of 2 x 2 pixels), for viewers (default 0)")
        return cls(remote=remote_options(),
                   deep=computation_options("PCA components of the deep features (default 0: all for dinov2, 32 for hybrid)"),
                   dask=dask_options(), classifier=classifier, pictures=pictures, batch=batch, pyramid=pyramid)
