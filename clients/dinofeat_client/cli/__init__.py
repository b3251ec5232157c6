"""The `dinofeat` command line: its parser and main. Without --server a command uses this user's local server (or an embedded one)."""

from __future__ import annotations

import argparse
import os
import sys

from dinofeat import __version__
from dinofeat.contract.computation import (
    DEEP_DEFAULT_SET,
    DEFAULT_BACKBONE,
    DEFAULT_PRESET,
    DEFAULT_SET,
    INPUT_RANGES,
    NORMALISATIONS,
    PRESETS,
    UPSAMPLERS,
)
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import io_failure, is_write_error, tidy_on_failure
from dinofeat.contract.wire import CLASSIFIERS, DEFAULT_CLASSIFIER

from ..client import PLAINTEXT_TOKEN_FLAG, PLAINTEXT_TOKEN_VARIABLE
from ..ilastik.provider import ILASTIK_DEFAULT_SET, ILASTIK_PCA
from .features import command_features
from .peers import command_arff, command_fiji_apply, command_fiji_train, command_ilastik
from .progress import ProgressBars, progress_seconds
from .segmentation import (
    command_apply,
    command_cluster,
    command_demo,
    command_fewshot,
    command_pca,
    command_score,
    command_segment,
    command_train,
)
from .weights import command_weights_random
from .servers import (
    LIMIT_FLAGS,
    command_local,
    command_serve,
    command_sets,
    command_status,
)


def deep_parser(pca_help: str) -> argparse.ArgumentParser:
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


def dask_parser() -> argparse.ArgumentParser:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinofeat", description="DINOv2 and classical feature stacks for Fiji, ilastik and Python.")
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
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
    deep = deep_parser("PCA components of the deep features (default 0: all for dinov2, 32 for hybrid)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("sets", parents=[remote], help="list the feature sets the server offers").set_defaults(run=command_sets)
    p = commands.add_parser("local", help="this user's local servers (started by commands without --server): status or stop")
    p.set_defaults(run=command_local)
    p.add_argument("action", nargs="?", choices=("status", "stop"), default="status", help="list them (default) or stop them")
    commands.add_parser("status", parents=[remote], help="what a server is doing: requests, models, memory, cache").set_defaults(
        run=command_status)

    dask = dask_parser()
    p = commands.add_parser("features", parents=[remote, deep, dask], help="compute a feature stack and write it as HDF5")
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

    fiji = commands.add_parser("fiji", help="Trainable Weka Segmentation in a local Fiji on dinofeat features")
    fiji_commands = fiji.add_subparsers(dest="fiji_command", required=True, metavar="train|apply")
    local_fiji = argparse.ArgumentParser(add_help=False)
    local_fiji.add_argument("--fiji", help="the local Fiji.app folder (default: $FIJI_DIR)")
    set_option(local_fiji)
    p = fiji_commands.add_parser("train", parents=[remote, deep, local_fiji], help="train a TWS classifier on labelled pixels")
    p.set_defaults(run=command_fiji_train, ends_at_once=True)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the TWS classifier (.model) to write")
    p.add_argument("--seed", type=int, help="the forest's random seed (default: TWS draws one)")
    p = fiji_commands.add_parser("apply", parents=[remote, deep, local_fiji], help="apply a TWS classifier to an image")
    p.set_defaults(run=command_fiji_apply, ends_at_once=True)
    p.add_argument("classifier", help="a .model file from `dinofeat fiji train` or TWS itself (trained on the same set)")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values)")
    p.add_argument("--probabilities", help="also write the per-class probabilities as a TIFF")

    p = commands.add_parser("arff", parents=[remote, deep], help="features of labelled pixels as a Weka ARFF file")
    p.set_defaults(run=command_arff)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the .arff file to write")
    set_option(p)

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
    p = commands.add_parser("segment", parents=[remote, deep, classifier, pictures, dask, pyramid],
                            help="segment an image from sparse scribbles")
    p.set_defaults(run=command_segment)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values), or an OME-Zarr "
                   "label image OUT.zarr (a volume: trained on its labelled slices, here or with --dask)")
    set_option(p)
    p.add_argument("--probabilities", help="also write the per-class probabilities to this .h5 file (.zarr for a .zarr output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .zarr output that dinofeat did not write")

    p = commands.add_parser("train", parents=[remote, deep, classifier, dask], help="train a classifier and save it as a model file")
    p.set_defaults(run=command_train)
    p.add_argument("images", nargs="+", help="training images")
    p.add_argument("--labels", nargs="+", required=True, help="one label image per training image, same order")
    p.add_argument("-o", "--output", required=True, help="model file to write (e.g. cells.dfm)")
    set_option(p)

    p = commands.add_parser("apply", parents=[remote, pictures, batch, dask, pyramid], help="apply a saved model file to images")
    p.set_defaults(run=command_apply)
    p.add_argument("model", help="model file written by `dinofeat train`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders of images, or glob patterns")
    p.add_argument("-o", "--output", required=True,
                   help="class map TIFF to write for one image, or a folder for several (NAME.tif each), or an OME-Zarr label "
                   "image OUT.zarr for one volume (here or with --dask)")
    p.add_argument("--probabilities", nargs="?", const=True,
                   help="also write the per-class probabilities: to this .h5 file (one image), or NAME.probabilities.h5 beside each "
                   "class map; with -o OUT.zarr, float32 to this .zarr (default OUT.probabilities.zarr)")
    p.add_argument("--set", help="check that the model uses this feature set")
    p.add_argument("--weights", help="weights file of a deep model's backbone (embedded server only; its sha256 must be the "
                   "one the model was trained with)")
    p.set_defaults(device="auto", backbone="*")  # --weights serves whichever backbone the model names

    p = commands.add_parser("cluster", parents=[remote, deep, pictures], help="k-means clusters of the features")
    p.set_defaults(run=command_cluster)
    p.add_argument("image")
    p.add_argument("-k", "--clusters", type=int, required=True, help="number of clusters")
    p.add_argument("-o", "--output", required=True, help="label TIFF to write (labels 1..k)")
    set_option(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = commands.add_parser("pca", parents=[remote, deep], help="3-component PCA picture of the features")
    p.set_defaults(run=command_pca)
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="picture to write: .png, or .tif (one RGB picture per slice of a stack)")
    set_option(p)

    p = commands.add_parser("fewshot", parents=[remote, deep, pictures, batch], help="segment queries from support images and masks")
    p.set_defaults(run=command_fewshot)
    p.add_argument("queries", nargs="+", help="query image files, folders of images, or glob patterns")
    p.add_argument("--support", nargs="+", required=True, help="support image(s)")
    p.add_argument("--support-mask", nargs="+", required=True, help="one mask per support image (non-zero = object)")
    p.add_argument("-o", "--output", required=True, help="folder for QUERY_mask.tif files (created if missing)")
    set_option(p, DEEP_DEFAULT_SET, f", the frozen encoder of seed 001{NEEDS_WEIGHTS}")
    p.add_argument("--window", type=int, default=0, help="ALP pooling window in grid cells (default 4)")
    p.add_argument("--grid", type=int, default=0, help="feature grid cell in pixels (default 4)")
    p.add_argument("--components", choices=("auto", "most_confident", "all"), default="auto",
                   help="predicted components each query keeps: auto (default) keeps the most confident one when every "
                        "support mask shows one solid object (an organ), all otherwise (networks, particles)")
    p.add_argument("--all-components", action="store_true", help="the same as --components all")

    p = commands.add_parser("ilastik", parents=[remote, deep_parser(f"PCA components of the deep features (default {ILASTIK_PCA})")],
                            help="feature files and a ready-to-open ilastik project")
    p.set_defaults(run=command_ilastik)
    p.add_argument("images", nargs="+", help="2-D images (one project lane each)")
    p.add_argument("-o", "--output", help="the new project's folder (created if missing)")
    set_option(p, ILASTIK_DEFAULT_SET, f": ilastik has its own filters{NEEDS_WEIGHTS}")
    p.add_argument("--labels", nargs="+", help="scribbles, one per image, shown in ilastik as labels")
    p.add_argument("--classes", nargs="+", help="class names, in ascending scribble value")
    p.add_argument("--quantise", default="float32", help="float32 (default), uint16 or uint8: smaller files, same classes")
    p.add_argument("--name", default="dinofeat", help="project file name (default dinofeat.ilp)")
    p.add_argument("--batch", metavar="PROJECT", help="add feature files for new images to this existing project (its folder "
                   "or its .ilp; its feature set and space); instead of -o")
    p.add_argument("--ilastik", metavar="RUN_ILASTIK", help="ilastik's run_ilastik.sh (default $DINOFEAT_ILASTIK): with --labels, "
                   "real ilastik trains the classifier once and stores it in the project, so headless runs predict without "
                   "retraining; with --batch, the printed command uses it")
    p.add_argument("--overwrite", action="store_true", help="with --batch: compute feature files again for images that have one "
                   "(default: skip those images)")

    p = commands.add_parser("score", help="per-class IoU and Dice of a class map against a ground truth")
    p.set_defaults(run=command_score)
    p.add_argument("prediction")
    p.add_argument("truth")
    p.add_argument("--match", action="store_true", help="pair the prediction's values with the ground truth's classes first "
                   "(for clusterings: each cluster gets the class it overlaps most, one to one)")

    p = commands.add_parser("serve", help="run a feature server")
    p.set_defaults(run=command_serve)
    p.add_argument("--config", help="server configuration (TOML with [server] and [limits]); flags override it")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default 50051)")
    p.add_argument("--device", help="one device: auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--devices", help="a pool instead of --device, --workers on each: all (every CUDA GPU, else the CPU), "
                   "cpu, or cuda:0,cuda:1")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without token or TLS")
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]PATH",
                   help="local weights for a backbone (repeatable); a bare PATH serves any backbone; anyup=PATH: AnyUp's weights")
    p.add_argument("--token-file", help="accepted access tokens, one per line; clients send one as a bearer token")
    p.add_argument("--tls-cert", help="server TLS certificate (PEM)")
    p.add_argument("--tls-key", help="server TLS key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--cache-dir", help="where recent feature results are kept (default: ~/.cache/dinofeat/results)")
    p.add_argument("--cache-gb", type=float, help="disk budget of the result cache in GB; 0 turns it off (default 8)")
    limits = p.add_argument_group("limits", "override the config file's [limits]; the README lists the defaults")
    for name, (kind, meaning) in LIMIT_FLAGS.items():
        limits.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N", help=meaning)

    weights = commands.add_parser("weights", help="weights files: a random checkpoint of a DINOv2 or DINOv3 backbone for trying deep sets offline")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="random")
    p = weights_commands.add_parser("random", help="write a seeded RANDOM checkpoint of a backbone (official layout): "
                                    "every deep command runs with --weights FILE, but its features carry no meaning",
                                    description="Write the official architecture of BACKBONE with seeded random weights, "
                                    "in the layout of the official .pth files, for trying the deep sets offline "
                                    "(--weights FILE.pth). Its features carry no meaning: never use them for results.")
    p.set_defaults(run=command_weights_random)
    p.add_argument("backbone", metavar="BACKBONE", help=f"an official backbone name (`dinofeat sets` lists them), e.g. {DEFAULT_BACKBONE} "
                   "(about 90 MB; vitb14 350 MB, vitl14 1.2 GB, vitg14 4.5 GB; _reg for 4 registers) or dinov3_vits16 (86 MB)")
    p.add_argument("-o", "--output", required=True, help="the .pth file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same weights (default 0)")

    p = commands.add_parser("demo", parents=[remote, deep], help="run the whole job on a generated sample")
    p.set_defaults(run=command_demo)
    p.add_argument("-o", "--output", default="dinofeat-demo", help="folder for the results (default ./dinofeat-demo)")
    set_option(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dinofeat ARGV`; its exit status. Run as the program (no `argv`: the `dinofeat` command, `python -m
    dinofeat_client.cli`), the process ends as soon as the command has finished (see end_process)."""
    args = build_parser().parse_args(argv)
    bars = ProgressBars(enabled=not getattr(args, "quiet", False), terminal=sys.stderr.isatty(),
                        every_s=progress_seconds())
    status = run_command(args, bars)
    bars.close()
    if argv is None or getattr(args, "ends_at_once", False):
        end_process(status)
    return status


def end_process(status: int) -> None:
    """End the process now with `status`, without the interpreter's teardown. Every command has written and
    closed its outputs (and stopped its embedded server) when it returns; what is left is freeing module by
    module what torch and scikit-learn loaded, about 0.5-1 s on a small CPU. Commands that start Java (Fiji)
    need it too: TWS's idle worker threads would keep a normal exit waiting, or abort it while Java shuts down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(args: argparse.Namespace, bars: ProgressBars) -> int:
    """Run the chosen command; its exit status (1 with one sentence for bad input or a failed read or write, 130
    when interrupted). Folders the command created for its outputs are removed again if it fails and they are empty."""
    try:
        with tidy_on_failure():
            args.run(args, bars)
    except DinofeatError as error:
        bars.close()
        print(f"dinofeat: error: {error}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:  # a write no write site caught (e.g. in a project's small files): one sentence
        if not is_write_error(error):
            raise
        bars.close()
        print(f"dinofeat: error: {io_failure(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print("dinofeat: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0

