"""Commands for the peer programs: Trainable Weka Segmentation in Fiji, Weka ARFF files and ilastik projects."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import check_image, check_labels, image_axes
from dinofeat.contract.outputs import atomic_result, atomic_write, output_file, writing

from ..batch import image_files, output_folder, run_batch
from ..ilastik.provider import ILASTIK_PCA
from ..image_files import read_image, write_tiff
from ..spaces import read_stored
from ..weka_arff import write_arff
from .common import check_outputs, computation_from_args, connect, finish_batch
from .features import hidden_features
from .progress import ProgressBars, say
from ..ilastik.provider import ILASTIK_DEFAULT_SET
from .options import NEEDS_WEIGHTS, SharedOptions, computation_options, set_option


def fiji_features(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, output: str):
    """Start Fiji (it must run before anything else starts a JVM), then fetch the image's features (hidden_features)."""
    from ..fiji.jvm import start_fiji

    fiji_dir = args.fiji or os.environ.get("FIJI_DIR")
    if not fiji_dir:
        raise DinofeatError("the Fiji bridge needs a local Fiji: pass --fiji /path/to/Fiji.app or set FIJI_DIR.")
    start_fiji(fiji_dir)
    return hidden_features(args, image, bars, output)


def greyscale(image: np.ndarray) -> np.ndarray:
    """What TWS is shown of the image (our features carry the colour): the mean over RGB channels."""
    return image.mean(axis=-1) if image_axes(image).endswith("c") else image


def command_fiji_train(args: argparse.Namespace, bars: ProgressBars) -> None:
    from ..fiji import tws

    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    output_file(args.output)
    with fiji_features(args, image, bars, args.output) as features:
        values = atomic_result(args.output, lambda temporary: tws.train(greyscale(image), labels, features.path, temporary, args.seed))
        stored = read_stored(features.path)
    sidecar = tws.description_path(args.output)
    atomic_write(sidecar, lambda temporary: temporary.write_text(json.dumps(
        {"computation": stored.computation.to_dict(), "feature_space": json.loads(stored.space_json)}, indent=2)))
    print(f"wrote {args.output} (Trainable Weka Segmentation classifier, classes {', '.join(map(str, values))}, "
          f"{stored.computation.feature_set} features) and {sidecar.name} (how its features are computed)")


def command_fiji_apply(args: argparse.Namespace, bars: ProgressBars) -> None:
    from ..fiji import tws

    image = check_image(read_image(args.image))
    check_outputs(args.output, args.probabilities)
    if not Path(args.classifier).is_file():
        raise DinofeatError(f"cannot read {args.classifier}: no such classifier file.")
    adopt_description(args, tws.description_path(args.classifier))
    with fiji_features(args, image, bars, args.output) as features:
        probabilities, values = tws.apply(args.classifier, greyscale(image), features.path)
    write_tiff(Path(args.output), tws.class_map(probabilities, values))
    if args.probabilities:
        write_tiff(Path(args.probabilities), probabilities.astype(np.float32))
    print(f"wrote {args.output}" + (f" and {args.probabilities}" if args.probabilities else ""))


def adopt_description(args: argparse.Namespace, sidecar: Path) -> None:
    """Compute a TWS classifier's features as `dinofeat fiji train` did: its description and feature space, stored in
    `sidecar`, become --like; a classifier without one needs its --set given."""
    if sidecar.is_file():
        args.like, args.like_source = str(sidecar), f"the classifier {args.classifier}"
    elif args.set is None:
        raise DinofeatError(f"{args.classifier} has no {sidecar.name} beside it (dinofeat fiji train writes one), so how its "
                            "features were computed is unknown; give --set and the options it was trained with.")


def command_arff(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Features of the labelled pixels as a Weka ARFF file."""
    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    output_file(args.output)
    with hidden_features(args, image, bars, args.output) as transfer, h5py.File(transfer.path, "r") as f:
        write_arff(f["features"], labels, args.output, relation=Path(args.image).stem)
    print(f"wrote {args.output} ({int((labels != 0).sum())} labelled pixels, {len(np.unique(labels[labels != 0]))} classes)")


def command_ilastik(args: argparse.Namespace, bars: ProgressBars) -> None:
    import shlex

    from ..ilastik.provider import (
        FEATURE_FILE,
        QUANTISATIONS,
        IlastikSpec,
        batch_features,
        build_project,
        find_project,
        headless_command,
        launcher_from,
        store_classifier,
        training_command,
    )

    if bool(args.output) == bool(args.batch):
        raise DinofeatError("give -o FOLDER for a new project, or --batch PROJECT for new images of an existing one.")
    if args.batch:
        folder, project, state = find_project(Path(args.batch))  # refuses a foreign or damaged .ilp before writing anything
        output_folder(folder)  # and a project folder this user cannot write in
        launcher = launcher_from(args.ilastik)
        inputs = image_files(args.images)  # files, folders and globs, as every command with several images

        def feature_file(path: Path) -> Path:
            return folder / Path(path).stem / FEATURE_FILE

        def within_batch(stage: str, done: int, total: int) -> None:
            if stage != "images":  # run_batch counts the images
                bars(stage, done, total)

        with connect(args) as client, writing(folder):
            report = run_batch(inputs, lambda path: batch_features(client, folder, [(str(path), check_image(read_image(path)))],
                                                                  progress=within_batch),
                               lambda path: not args.overwrite and feature_file(path).exists(), bars)
        bars.close()
        files = [feature_file(path) for path in inputs if feature_file(path).exists() and path not in dict(report.failed)]
        if report.done:
            print("wrote " + ", ".join(str(feature_file(path)) for path in report.done))

        def hints() -> None:  # after the summary: the command to copy comes last
            if not (project and files):
                return
            if not state.labelled and not state.classifier:
                print(f"{project.name} has no labels yet: label in ilastik (Training) and save the project before predicting.")
            elif not state.classifier:
                print(f"{project.name} stores no classifier, so ilastik trains one from its labels at the start of each run "
                      f"(to store one: {training_command(project, launcher)})")
            print("predict them with the trained project:\n  " + headless_command(project, files, launcher))

        finish_batch(report, len(inputs), hints)
        return
    folder = Path(args.output)
    images = [(p, check_image(read_image(p))) for p in args.images]
    if args.quantise not in QUANTISATIONS:
        raise DinofeatError(f"unknown quantisation {args.quantise!r}; choose one of {', '.join(QUANTISATIONS)}.")
    scribbles = None
    if args.labels:
        if len(args.labels) != len(images):
            raise DinofeatError(f"give one scribble file per image ({len(images)} images, {len(args.labels)} scribble files).")
        scribbles = [check_labels(read_image(p), image) for p, (_, image) in zip(args.labels, images)]
    if args.ilastik and not scribbles:
        raise DinofeatError("--ilastik trains the project's classifier from the scribbles; give them with --labels too.")
    launcher = launcher_from(args.ilastik) if scribbles else None  # checked before the features are computed
    created = not folder.exists()
    output_folder(folder)
    computation = computation_from_args(args)
    if computation.deep and args.pca is None:  # channels become ilastik's inputs: a modest count
        computation = replace(computation, pca=ILASTIK_PCA)
    spec = IlastikSpec.of(computation, args.quantise)
    try:
        with connect(args) as client, writing(folder):
            project, files = build_project(client, images, folder, spec, scribbles, args.classes, args.name, progress=bars)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a failed first run leaves no empty project folder behind
        raise
    bars.close()
    print(f"wrote {project} with {len(files)} lane(s): {', '.join(str(f.relative_to(folder)) for f in files)}")
    if launcher:
        if bars.enabled:
            say("dinofeat: ilastik (headless) is training the classifier from the labels...")
        seconds = store_classifier(project, launcher)
        print(f"stored the classifier ilastik trained from the labels in {project.name} ({seconds:.0f} s): "
              "headless runs predict without retraining")
    elif scribbles:
        print(f"ilastik will train the classifier from the labels on its first run, and in every headless run until one is "
              f"stored; to store it, save the project in ilastik or run {training_command(project, None)} (or give "
              "dinofeat --ilastik PATH/run_ilastik.sh)")
    print(f"open it in ilastik (Pixel Classification); new images: dinofeat ilastik --batch {shlex.quote(str(folder))} IMAGE...")


def add_parsers(commands: argparse._SubParsersAction, shared: SharedOptions) -> None:
    """The commands for the peer programs: fiji train/apply, arff, ilastik."""
    fiji = commands.add_parser("fiji", help="Trainable Weka Segmentation in a local Fiji on dinofeat features")
    fiji_commands = fiji.add_subparsers(dest="fiji_command", required=True, metavar="train|apply")
    local_fiji = argparse.ArgumentParser(add_help=False)
    local_fiji.add_argument("--fiji", help="the local Fiji.app folder (default: $FIJI_DIR)")
    set_option(local_fiji)
    p = fiji_commands.add_parser("train", parents=[shared.remote, shared.deep, local_fiji],
                                 help="train a TWS classifier on labelled pixels")
    p.set_defaults(run=command_fiji_train, ends_at_once=True)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the TWS classifier (.model) to write")
    p.add_argument("--seed", type=int, help="the forest's random seed (default: TWS draws one)")
    p = fiji_commands.add_parser("apply", parents=[shared.remote, shared.deep, local_fiji],
                                 help="apply a TWS classifier to an image")
    p.set_defaults(run=command_fiji_apply, ends_at_once=True)
    p.add_argument("classifier", help="a .model file from `dinofeat fiji train` or TWS itself (trained on the same set)")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values)")
    p.add_argument("--probabilities", help="also write the per-class probabilities as a TIFF")

    p = commands.add_parser("arff", parents=[shared.remote, shared.deep],
                            help="features of labelled pixels as a Weka ARFF file")
    p.set_defaults(run=command_arff)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the .arff file to write")
    set_option(p)

    p = commands.add_parser("ilastik", parents=[shared.remote, computation_options(f"PCA components of the deep features (default {ILASTIK_PCA})")],
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
