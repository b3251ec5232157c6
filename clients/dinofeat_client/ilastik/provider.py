"""Feature files for ilastik, all in one feature space: the server fits the space (PCA and per-channel
scaling) once over the project's images and computes every stack in it; the space is stored in the
project folder, so images added later with `--batch` land in the same space.

Project folder:
    <name>.ilp                the Pixel Classification project (see project.py)
    <image>/features.h5       one per image: dataset `features` (C, Y, X), chunks (C, 64, 64), axistags c,y,x,
                              and the group /feature_space; one folder per image, so that ilastik's batch
                              export names its result <image>_Probabilities.h5 (see headless.py)
    dinofeat_ilastik.json     feature set, options, quantisation
    dinofeat_space.json       the feature space (as in every feature file's /feature_space/json)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.computation import FeatureComputation, stored_computation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import image_axes
from dinofeat.contract.wire import axistags

from ..client import FeatureClient, Progress
from ..spaces import SPACE_GROUP, read_space, write_space
from .headless import headless_command, launcher_from, store_classifier, training_command
from .project import Lane, ProjectState, check_project, write_project

SPEC_FILE = "dinofeat_ilastik.json"
SPACE_FILE = "dinofeat_space.json"
FEATURE_FILE = "features.h5"
"""Each image's feature file, in a folder named after the image: <image>/features.h5."""
ILASTIK_CHUNK = 64
ROWS_PER_BLOCK = 256
"""Rows read at a time: one row of the streamed files' 256 x 256 chunks, so each chunk is read once."""
QUANTISATIONS = {"float32": None, "uint8": 255, "uint16": 65535}


ILASTIK_DEFAULT_SET = "hybrid"
"""ilastik has its own filter banks: what it lacks, and what a project of ours brings, is the deep part."""
ILASTIK_PCA = 48
"""PCA components of the deep part of an ilastik project's features unless --pca says otherwise."""


@dataclass(frozen=True)
class IlastikSpec:
    """How the project's features are made (the whole computation) and stored (the quantisation); kept beside the
    project, so `--batch` computes new images' features the same way."""

    computation: FeatureComputation = FeatureComputation(ILASTIK_DEFAULT_SET, pca=ILASTIK_PCA)
    quantise: str = "float32"

    @classmethod
    def of(cls, computation: FeatureComputation, quantise: str) -> IlastikSpec:
        """Quantised files need every channel in [0, 1]: the space's robust range ("minmax"; hybrid always has it)."""
        if quantise != "float32" and computation.normalise != "minmax":
            if computation.normalise != "none":
                raise DinofeatError(f"--quantise {quantise} stores every channel in [0, 1], which needs --normalise minmax, not "
                                    f"{computation.normalise}; leave --normalise out.")
            computation = replace(computation, normalise="minmax")
        return cls(computation.checked(), quantise)

    def to_dict(self) -> dict:
        return {"computation": self.computation.to_dict(), "quantise": self.quantise}

    @classmethod
    def from_dict(cls, value: dict) -> IlastikSpec:
        """The stored spec; a project of an earlier dinofeat stored the set's fields beside the quantisation."""
        if "computation" in value:
            return cls(FeatureComputation.from_dict(value["computation"]), value.get("quantise", "float32"))
        quantise = value.get("quantise", "float32")
        name = value.get("feature_set", ILASTIK_DEFAULT_SET)
        spec = {"name": name, "backbone": value.get("backbone"), "preset": value.get("preset"), "pca": value.get("pca", 0),
                "normalisation": "minmax" if quantise != "float32" or name == "hybrid" else "none"}
        return cls(stored_computation(None, {k: v for k, v in spec.items() if v is not None}), quantise)


def write_feature_file(path: Path, fetched: Path, spec: IlastikSpec) -> list[str]:
    """The ilastik feature file from a fetched one: chunks of all channels by 64 x 64 pixels (ilastik
    reads pixel neighbourhoods), quantised on request; returns the channel names."""
    top = QUANTISATIONS[spec.quantise]
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(fetched, "r") as source, h5py.File(partial, "w") as f:
            features = source["features"]
            names = [str(n) for n in features.attrs["channel_names"]]
            channels, height, width = features.shape
            data = f.create_dataset("features", shape=features.shape, dtype=spec.quantise,
                                    chunks=(channels, min(ILASTIK_CHUNK, height), min(ILASTIK_CHUNK, width)),
                                    compression="gzip", compression_opts=1, shuffle=True)
            data.attrs["axistags"] = axistags("cyx")
            data.attrs.create("channel_names", np.array(names, dtype=object), dtype=h5py.string_dtype())
            data.attrs["dinofeat_spec"] = json.dumps(spec.to_dict())
            for y0 in range(0, height, ROWS_PER_BLOCK):
                block = features[:, y0 : y0 + ROWS_PER_BLOCK]
                if top is not None:
                    block = np.clip(np.round(block * top), 0, top)
                data[:, y0 : y0 + ROWS_PER_BLOCK] = block.astype(spec.quantise)
            write_space(f, json.loads(source[SPACE_GROUP]["json"][()]))
    except BaseException:  # nothing half-written stays behind
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return names


def fetch_in_space(client: FeatureClient, image: np.ndarray, stem: str, folder: Path, spec: IlastikSpec,
                   progress: Progress | None, like: str | None, fit_images: list[np.ndarray] | None = None) -> Path:
    """The server's stack of one image in the project's space (`like`), or in one it fits over `fit_images`."""
    path = folder / f".{stem}.fetched.h5"
    client.fetch_features(image, path, spec.computation, compression="none", progress=progress, like=like,
                          fit_images=fit_images)  # temporary: no deflate on either side
    return path


def check_2d(image: np.ndarray, name: str) -> None:
    if image_axes(image) not in ("yx", "yxc"):
        raise DinofeatError(f"{name} is a stack; the ilastik provider writes 2-D projects, so give its slices as separate images.")


def image_features(client: FeatureClient, folder: Path, name: str, image: np.ndarray, spec: IlastikSpec,
                   progress: Progress | None, space: str | None, fit_images: list[np.ndarray] | None = None) -> tuple[Path, list[str], str]:
    """One image's feature file, <folder>/<image>/features.h5, in the project's space (or one fitted over
    `fit_images`); (file, channel names, space). A failure leaves neither the file nor an empty image folder."""
    stem = Path(name).stem
    output = folder / stem / FEATURE_FILE
    made = not output.parent.exists()
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetched = fetch_in_space(client, image, stem, folder, spec, progress, space, fit_images)
        try:
            space = space or read_space(fetched)
            channels = write_feature_file(output, fetched, spec)
        finally:
            fetched.unlink(missing_ok=True)
    except BaseException:
        if made and not any(output.parent.iterdir()):
            output.parent.rmdir()
        raise
    return output, channels, space


def build_project(client: FeatureClient, images: list[tuple[str, np.ndarray]], folder: Path, spec: IlastikSpec,
                  scribbles: list[np.ndarray] | None = None, classes: list[str] | None = None,
                  project_name: str = "dinofeat", progress: Progress | None = None) -> tuple[Path, list[Path]]:
    """Feature files for every image in one space fitted over all of them, the stored space and spec, and
    the .ilp project; returns (project, files)."""
    for name, image in images:
        check_2d(image, name)
    values = sorted({int(v) for s in scribbles or [] for v in np.unique(s) if v != 0})
    names = classes or [f"class {v}" for v in values] or ["Label 1", "Label 2"]
    if scribbles and classes and len(classes) != len(values):
        raise DinofeatError(f"the scribbles hold {len(values)} classes ({', '.join(map(str, values))}) but {len(classes)} names were given.")
    files, lanes, space = [], [], None
    for number, (name, image) in enumerate(images):
        if progress:
            progress("images", number, len(images))
        fit = [other for _, other in images] if space is None and len(images) > 1 else None
        output, channels, space = image_features(client, folder, name, image, spec, progress, space, fit)
        mapped = None
        if scribbles:
            mapped = np.searchsorted(values, scribbles[number]).astype(np.uint8) + 1
            mapped[scribbles[number] == 0] = 0
        lanes.append(Lane(output.relative_to(folder).as_posix(), "features", (len(channels), *image.shape[:2]), axistags("cyx"),
                          Path(name).stem, mapped))
        files.append(output)
    if progress:
        progress("images", len(images), len(images))
    (folder / SPACE_FILE).write_text(space)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    return write_project(folder / f"{project_name}.ilp", lanes, names), files


def find_project(target: Path) -> tuple[Path, Path | None, ProjectState | None]:
    """The project that --batch names: a dinofeat project folder, or the .ilp in one; (folder, project, its state),
    project None when the folder holds no .ilp. Every refusal is one sentence, before anything is written."""
    if target.is_file() or target.suffix == ".ilp":
        folder, projects = target.parent, [target]
    else:
        folder = target
        projects = sorted(p for p in folder.glob("*.ilp") if not p.name.startswith("."))  # not ilastik's or our temporaries
        if len(projects) > 1:
            raise DinofeatError(f"{folder} holds {len(projects)} ilastik projects ({', '.join(p.name for p in projects)}); "
                                f"name one: --batch {folder / projects[0].name}.")
    state = check_project(projects[0]) if projects else None
    check_folder(folder, projects[0] if projects else None)
    read_spec(folder)
    return folder, (projects[0] if projects else None), state


def check_folder(folder: Path, project: Path | None = None) -> None:
    """Refuse a folder without the spec and space `dinofeat ilastik` stores beside its project."""
    if not folder.is_dir():
        raise DinofeatError(f"{folder}: no such folder; give the folder `dinofeat ilastik -o FOLDER` created, or the .ilp in it.")
    missing = [name for name in (SPEC_FILE, SPACE_FILE) if not (folder / name).is_file()]
    if missing:
        what = f"{project} was not made by `dinofeat ilastik`" if project else f"{folder} is not a dinofeat ilastik project folder"
        raise DinofeatError(f"{what} (no {' or '.join(missing)} beside it), so its feature space is unknown; create a "
                            "project with `dinofeat ilastik IMAGES -o FOLDER`.")


def read_spec(folder: Path) -> IlastikSpec:
    """The project's stored IlastikSpec (dinofeat_ilastik.json)."""
    try:
        return IlastikSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    except (ValueError, TypeError, AttributeError, DinofeatError):
        raise DinofeatError(f"{folder / SPEC_FILE} is damaged (not the JSON `dinofeat ilastik` writes); create the "
                            "project again with `dinofeat ilastik IMAGES -o FOLDER`.") from None


def batch_features(client: FeatureClient, folder: Path, images: list[tuple[str, np.ndarray]],
                   progress: Progress | None = None) -> list[Path]:
    """Feature files for new images with the project's stored feature set and space."""
    check_folder(folder)
    spec = read_spec(folder)
    space = (folder / SPACE_FILE).read_text()
    for name, image in images:
        check_2d(image, name)
    files = []
    for number, (name, image) in enumerate(images):
        if progress:
            progress("images", number, len(images))
        files.append(image_features(client, folder, name, image, spec, progress, space)[0])
    if progress:
        progress("images", len(images), len(images))
    return files


__all__ = ["IlastikSpec", "build_project", "batch_features", "find_project", "headless_command", "launcher_from",
           "store_classifier", "training_command", "QUANTISATIONS"]
