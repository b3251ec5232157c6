"""Segmentation commands: segment, train, apply, cluster, pca, fewshot, score and the demo."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import check_image, check_labels, check_mask, image_axes
from dinofeat.contract.outputs import output_file, remove_quietly
from dinofeat.contract.computation import DEEP_DEFAULT_SET

from ..batch import image_files, output_folder, remove_earlier_outputs, run_batch, writes_to_folder
from ..image_files import read_image, write_png, write_tiff
from ..metrics import class_dice, class_iou, matched_to_truth
from ..pictures import class_overlay, colour_names, drawable, probability_pictures
from ..sample import three_phase_sample
from .common import (
    check_outputs,
    checked_suffix,
    connect,
    computation_from_args,
    finish_batch,
    take_dataset,
)
from .progress import ProgressBars, tell
from .volumes import dask_train, wants_zarr, zarr_apply, zarr_segment
from .options import NEEDS_WEIGHTS, SharedOptions, set_option


def command_segment(args: argparse.Namespace, bars: ProgressBars) -> None:
    if wants_zarr(args):
        return zarr_segment(args, bars)
    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    check_outputs(args.output, args.probabilities)
    with connect(args) as client:
        output, probabilities = client.segment(image, labels, args.output, computation_from_args(args),
                                               probabilities=probabilities_target(args, args.output, args.probabilities),
                                               classifier=args.classifier, trees=args.trees, seed=args.seed, progress=bars)
    bars.close()
    report_segmentation(args, image, output, probabilities, keep=bool(args.probabilities))


def probabilities_target(args: argparse.Namespace, output: str | Path, requested: str | Path | None) -> Path | None:
    """Where the probabilities go: the file the user asked for, else a hidden one when --pictures draws them."""
    if requested:
        return Path(requested)
    return Path(output).with_name(f".{Path(output).name}.pictures.h5") if args.pictures else None


def write_pictures(image: np.ndarray, output: Path, probabilities: Path | None, written: list[Path]) -> str:
    """The overlay and probability maps beside `output` (appended to `written`); returns what to add to the report."""
    image, class_map, z, note = drawable(image, read_image(output))
    written.append(write_png(output.with_suffix(".overlay.png"), class_overlay(image, class_map)))
    if probabilities:
        with h5py.File(probabilities, "r") as f:
            for value, picture in probability_pictures(f["probabilities"], z):
                written.append(write_png(output.with_suffix(f".p{value}.png"), picture))
    return note + "; overlay colours: " + colour_names([int(v) for v in np.unique(class_map)])


def report_segmentation(args: argparse.Namespace, image: np.ndarray, output: Path, probabilities: Path | None,
                        keep: bool = True) -> list[Path]:
    """Say what was written, and return it; with --pictures also write the class overlay (with its legend) and one
    probability map per class as PNG, of the middle slice for a stack. Probabilities not asked for
    (`keep` False) are removed once drawn."""
    written = [output] + ([probabilities] if probabilities and keep else [])
    note = ""
    try:
        if args.pictures:
            note = write_pictures(image, output, probabilities, written)
    finally:
        if probabilities and not keep:
            remove_quietly(probabilities)
    tell("wrote " + ", ".join(str(p) for p in written) + note)
    return written


def apply_outputs(output: Path) -> str:
    """Every file name apply writes for the class map `output`: itself, NAME.probabilities.h5, and the pictures
    NAME.overlay.png and NAME.pVALUE.png (a regular expression, for remove_earlier_outputs)."""
    return re.escape(output.stem) + "(" + re.escape(output.suffix) + r"|\.probabilities\.h5|\.overlay\.png|\.p-?\d+\.png)"


def command_train(args: argparse.Namespace, bars: ProgressBars) -> None:
    if args.dask:
        return dask_train(args, bars)
    if len(args.images) != len(args.labels):
        raise DinofeatError(f"give one --labels file per image ({len(args.images)} images, {len(args.labels)} label files).")
    images = [check_image(read_image(p)) for p in args.images]
    labels = [check_labels(read_image(p), i) for p, i in zip(args.labels, images)]
    output_file(args.output)
    with connect(args) as client:
        summary = client.train(images, labels, args.output, computation_from_args(args), classifier=args.classifier,
                               trees=args.trees, seed=args.seed, progress=bars)
    bars.close()
    print(f"wrote {args.output}: {summary.classifier} on {summary.labelled_pixels} labelled pixels, "
          f"classes {', '.join(str(v) for v in summary.class_values)}")


def command_apply(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Apply a model to one image (-o the class map) or many (-o a folder), with one model upload; a volume to
    -o OUT.zarr (in this process, or on --dask workers) as zarr_apply."""
    if wants_zarr(args):
        return zarr_apply(args, bars)
    inputs = image_files(args.images)
    if not writes_to_folder(inputs, args.output):
        image = check_image(read_image(inputs[0]))
        requested = Path(args.output).with_suffix(".probabilities.h5") if args.probabilities is True else args.probabilities
        check_outputs(args.output, requested)
        with connect(args) as client:
            output, probabilities = client.apply(args.model, image, args.output,
                                                 probabilities=probabilities_target(args, args.output, requested),
                                                 feature_set=args.set or "", progress=bars)
        bars.close()
        written = report_segmentation(args, image, output, probabilities, keep=bool(requested))
        if args.overwrite:
            remove_earlier_outputs(Path(output).absolute().parent, apply_outputs(Path(output)), written)
        return
    if isinstance(args.probabilities, str):
        raise DinofeatError("with an output folder --probabilities takes no file name: each image's probabilities "
                            "go to OUTDIR/NAME.probabilities.h5.")
    folder = output_folder(args.output)

    def outputs(path: Path) -> tuple[Path, Path | None]:
        return folder / f"{path.stem}.tif", folder / f"{path.stem}.probabilities.h5" if args.probabilities else None

    with connect(args) as client:
        def work(path: Path) -> None:
            image = check_image(read_image(path))
            output, requested = outputs(path)
            output, probabilities = client.apply(args.model, image, output, probabilities=probabilities_target(args, output, requested),
                                                 feature_set=args.set or "", progress=bars)
            written = report_segmentation(args, image, output, probabilities, keep=bool(requested))
            if args.overwrite:
                remove_earlier_outputs(folder, apply_outputs(output), written)

        report = run_batch(inputs, work, lambda path: not args.overwrite and outputs(path)[0].exists(), bars)
    bars.close()
    finish_batch(report, len(inputs))


def command_cluster(args: argparse.Namespace, bars: ProgressBars) -> None:
    checked_suffix(args.output, ("tiff",), "cluster")
    image = check_image(read_image(args.image))
    folder = output_file(args.output).absolute().parent
    with connect(args) as client:
        path = client.analyse(image, "kmeans", folder / f".{Path(args.output).name}.h5", computation_from_args(args),
                              clusters=args.clusters, seed=args.seed, progress=bars)
    bars.close()
    labels = take_dataset(path, "labels")[0]
    written, note = [write_tiff(Path(args.output), labels)], ""
    if args.pictures:
        plane, classes, _, note = drawable(image, labels)
        written.append(write_png(Path(args.output).with_suffix(".overlay.png"), class_overlay(plane, classes)))
    print(f"wrote {', '.join(str(p) for p in written)} ({args.clusters} clusters, labels 1..{args.clusters}){note}")


def command_pca(args: argparse.Namespace, bars: ProgressBars) -> None:
    kind = checked_suffix(args.output, ("png", "tiff"), "pca")
    image = check_image(read_image(args.image))
    if kind == "png" and image_axes(image).startswith("z"):
        raise DinofeatError(f"a stack gives one picture per slice, which PNG cannot hold; name the output {Path(args.output).stem}.tif.")
    folder = output_file(args.output).absolute().parent
    with connect(args) as client:
        path = client.analyse(image, "pca", folder / f".{Path(args.output).name}.h5", computation_from_args(args), progress=bars)
    bars.close()
    picture = np.moveaxis(take_dataset(path, "picture"), 0, -1)  # (Y, X, 3), or (Z, Y, X, 3) for a stack
    print(f"wrote {(write_png if kind == 'png' else write_tiff)(Path(args.output), picture)}")


def command_fewshot(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Segment each query from the supports; -o is a folder of QUERY_mask.tif files (see batch.py)."""
    if len(args.support) != len(args.support_mask):
        raise DinofeatError("give one --support-mask per --support image.")
    supports = [check_image(read_image(p)) for p in args.support]
    masks = [check_mask(read_image(p), support, f"the support mask {p}") for p, support in zip(args.support_mask, supports)]
    queries = image_files(args.queries)
    computation = computation_from_args(args)
    folder = output_folder(args.output)
    with connect(args) as client:
        def work(path: Path) -> None:
            query = check_image(read_image(path))
            result = client.few_shot(supports, masks, query, folder / f".{path.stem}.fewshot.h5", computation, window=args.window,
                                     grid=args.grid, components="all" if args.all_components else args.components, progress=bars)
            mask = (take_dataset(result, "fewshot")[0] > 0.5).astype(np.uint8) * 255
            written, note = [write_tiff(folder / f"{path.stem}_mask.tif", mask)], ""
            if args.pictures:
                plane, classes, _, note = drawable(query, mask)
                written.append(write_png(folder / f"{path.stem}_mask.overlay.png", class_overlay(plane, classes)))
            tell("wrote " + ", ".join(str(p) for p in written) + note)
            if args.overwrite:
                remove_earlier_outputs(folder, re.escape(path.stem) + r"_mask(\.tif|\.overlay\.png)", written)

        report = run_batch(queries, work, lambda path: not args.overwrite and (folder / f"{path.stem}_mask.tif").exists(), bars)
    bars.close()
    finish_batch(report, len(queries))


def command_score(args: argparse.Namespace, bars: ProgressBars) -> None:
    prediction, truth = read_image(args.prediction), read_image(args.truth)
    if prediction.shape != truth.shape:
        raise DinofeatError(f"the prediction has shape {prediction.shape} but the ground truth has {truth.shape}; they must match.")
    if args.match:
        prediction = matched_to_truth(prediction, truth)
    elif not set(np.unique(prediction).tolist()) & set(np.unique(truth).tolist()):
        values = ", ".join(str(v) for v in np.unique(prediction)[:8])
        raise DinofeatError(f"the prediction's values ({values}) share none with the ground truth's "
                            f"({', '.join(str(v) for v in np.unique(truth)[:8])}); for a clustering add --match, which pairs "
                            "each cluster with the class it overlaps most (Hungarian assignment).")
    ious, dice = class_iou(prediction, truth), class_dice(prediction, truth)
    print(f"{'class':>8} {'IoU':>7} {'Dice':>7}")
    for value in ious:
        print(f"{value:>8} {ious[value]:7.4f} {dice[value]:7.4f}")
    print(f"{'mean':>8} {np.mean(list(ious.values())):7.4f} {np.mean(list(dice.values())):7.4f}")


def command_demo(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Generate a sample micrograph with scribbles, then features, segmentation and a picture of it."""
    folder = output_folder(args.output)
    sample = three_phase_sample()
    write_tiff(folder / "sample.tif", sample.image)
    write_tiff(folder / "scribbles.tif", sample.scribbles)
    write_tiff(folder / "ground_truth.tif", sample.truth)
    computation = computation_from_args(args)
    with connect(args) as client:
        features = client.fetch_features(sample.image, folder / "features.h5", computation, progress=bars)
        segmentation, probabilities = client.segment(sample.image, sample.scribbles, folder / "segmentation.tif", computation,
                                                     probabilities=folder / "probabilities.h5", progress=bars)
    bars.close()
    class_map = read_image(segmentation)
    write_png(folder / "segmentation.overlay.png", class_overlay(sample.image, class_map))
    ious = class_iou(class_map, sample.truth)
    print(f"demo on a generated {sample.image.shape[1]}x{sample.image.shape[0]} three-phase micrograph, "
          f"{int((sample.scribbles > 0).sum())} scribbled pixels, feature set '{computation.feature_set}':")
    for name in ("sample.tif", "scribbles.tif", "ground_truth.tif"):
        print(f"  input         {folder / name}")
    print(f"  features      {features.path}")
    print(f"  segmentation  {segmentation}  (probabilities: {probabilities})")
    print(f"  picture       {folder / 'segmentation.overlay.png'}  (overlay colours: "
          f"{colour_names([int(v) for v in np.unique(class_map)])})")
    print("  IoU per class " + ", ".join(f"{v}: {iou:.3f}" for v, iou in ious.items())
          + f"; mIoU {sum(ious.values()) / len(ious):.3f}")


def add_parsers(commands: argparse._SubParsersAction, shared: SharedOptions) -> None:
    """The commands that segment and analyse: segment, train, apply, cluster, pca, fewshot, score, demo."""
    p = commands.add_parser("segment", parents=[shared.remote, shared.deep, shared.classifier, shared.pictures, shared.dask, shared.pyramid],
                            help="segment an image from sparse scribbles")
    p.set_defaults(run=command_segment)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values), or an OME-Zarr "
                   "label image OUT.zarr (a volume: trained on its labelled slices, here or with --dask)")
    set_option(p)
    p.add_argument("--probabilities", help="also write the per-class probabilities to this .h5 file (.zarr for a .zarr output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .zarr output that dinofeat did not write")

    p = commands.add_parser("train", parents=[shared.remote, shared.deep, shared.classifier, shared.dask],
                            help="train a classifier and save it as a model file")
    p.set_defaults(run=command_train)
    p.add_argument("images", nargs="+", help="training images")
    p.add_argument("--labels", nargs="+", required=True, help="one label image per training image, same order")
    p.add_argument("-o", "--output", required=True, help="model file to write (e.g. cells.dfm)")
    set_option(p)

    p = commands.add_parser("apply", parents=[shared.remote, shared.pictures, shared.batch, shared.dask, shared.pyramid],
                            help="apply a saved model file to images")
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

    p = commands.add_parser("cluster", parents=[shared.remote, shared.deep, shared.pictures],
                            help="k-means clusters of the features")
    p.set_defaults(run=command_cluster)
    p.add_argument("image")
    p.add_argument("-k", "--clusters", type=int, required=True, help="number of clusters")
    p.add_argument("-o", "--output", required=True, help="label TIFF to write (labels 1..k)")
    set_option(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = commands.add_parser("pca", parents=[shared.remote, shared.deep], help="3-component PCA picture of the features")
    p.set_defaults(run=command_pca)
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="picture to write: .png, or .tif (one RGB picture per slice of a stack)")
    set_option(p)

    p = commands.add_parser("fewshot", parents=[shared.remote, shared.deep, shared.pictures, shared.batch],
                            help="segment queries from support images and masks")
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

    p = commands.add_parser("score", help="per-class IoU and Dice of a class map against a ground truth")
    p.set_defaults(run=command_score)
    p.add_argument("prediction")
    p.add_argument("truth")
    p.add_argument("--match", action="store_true", help="pair the prediction's values with the ground truth's classes first "
                   "(for clusterings: each cluster gets the class it overlaps most, one to one)")

    p = commands.add_parser("demo", parents=[shared.remote, shared.deep], help="run the whole job on a generated sample")
    p.set_defaults(run=command_demo)
    p.add_argument("-o", "--output", default="dinofeat-demo", help="folder for the results (default ./dinofeat-demo)")
    set_option(p)
