"""Feature files for ilastik, all in one feature space: the server fits the space (PCA and per-channel
scaling) once over the project's images and computes every stack in it; the space is stored in the
project folder, so images added later with `--batch` land in the same space.

Project folder:
    <name>.ilp                the Pixel Classification project (see project.py)
    <image>_features.h5       one per image: dataset `features` (C, Y, X), chunks (C, 64, 64), axistags c,y,x,
                              and the group /feature_space
    dinofeat_ilastik.json     feature set, options, quantisation
    dinofeat_space.json       the feature space (as in every feature file's /feature_space/json)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from ..client import FeatureClient, Progress
from ..errors import DinofeatError
from ..images import image_axes
from ..spaces import SPACE_GROUP, read_space, write_space
from ..wire import DEFAULT_BACKBONE, DEFAULT_PRESET, axistags
from .project import Lane, headless_command, write_project

SPEC_FILE = "dinofeat_ilastik.json"
SPACE_FILE = "dinofeat_space.json"
ILASTIK_CHUNK = 64
ROWS_PER_BLOCK = 256
"""Rows read at a time: one row of the streamed files' 256 x 256 chunks, so each chunk is read once."""
QUANTISATIONS = {"float32": None, "uint8": 255, "uint16": 65535}


ILASTIK_PCA = 48
"""PCA components of the deep part of an ilastik project's features unless --pca says otherwise."""


@dataclass(frozen=True)
class IlastikSpec:
    """How the project's features are made; stored with the project."""

    feature_set: str = "hybrid"
    backbone: str = DEFAULT_BACKBONE
    preset: str = DEFAULT_PRESET
    pca: int = ILASTIK_PCA
    quantise: str = "float32"

    def normalise(self) -> str:
        """Quantised files need every channel in [0, 1]: the space's robust range (hybrid always has it)."""
        return "minmax" if self.quantise != "float32" and self.feature_set != "hybrid" else "none"

    def options(self) -> dict:
        return {"backbone": self.backbone, "preset": self.preset, "pca": self.pca, "normalise": self.normalise()}


def write_feature_file(path: Path, fetched: Path, spec: IlastikSpec) -> list[str]:
    """The ilastik feature file from a fetched one: chunks of all channels by 64 x 64 pixels (ilastik
    reads pixel neighbourhoods), quantised on request; returns the channel names."""
    top = QUANTISATIONS[spec.quantise]
    partial = path.with_name(path.name + ".partial")
    with h5py.File(fetched, "r") as source, h5py.File(partial, "w") as f:
        features = source["features"]
        names = [str(n) for n in features.attrs["channel_names"]]
        channels, height, width = features.shape
        data = f.create_dataset("features", shape=features.shape, dtype=spec.quantise,
                                chunks=(channels, min(ILASTIK_CHUNK, height), min(ILASTIK_CHUNK, width)),
                                compression="gzip", compression_opts=1, shuffle=True)
        data.attrs["axistags"] = axistags("cyx")
        data.attrs.create("channel_names", np.array(names, dtype=object), dtype=h5py.string_dtype())
        data.attrs["dinofeat_spec"] = json.dumps(asdict(spec))
        for y0 in range(0, height, ROWS_PER_BLOCK):
            block = features[:, y0 : y0 + ROWS_PER_BLOCK]
            if top is not None:
                block = np.clip(np.round(block * top), 0, top)
            data[:, y0 : y0 + ROWS_PER_BLOCK] = block.astype(spec.quantise)
        write_space(f, json.loads(source[SPACE_GROUP]["json"][()]))
    partial.replace(path)
    return names


def fetch_in_space(client: FeatureClient, image: np.ndarray, stem: str, folder: Path, spec: IlastikSpec,
                   progress: Progress | None, like: str | None, fit_images: list[np.ndarray] | None = None) -> Path:
    """The server's stack of one image in the project's space (`like`), or in one it fits over `fit_images`."""
    path = folder / f".{stem}.fetched.h5"
    client.fetch_features(image, path, spec.feature_set, compression="none", progress=progress, like=like,
                          fit_images=fit_images, **spec.options())  # temporary: no deflate on either side
    return path


def check_2d(image: np.ndarray, name: str) -> None:
    if image_axes(image) not in ("yx", "yxc"):
        raise DinofeatError(f"{name} is a stack; the ilastik provider writes 2-D projects, so give its slices as separate images.")


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
        fetched = fetch_in_space(client, image, Path(name).stem, folder, spec, progress, space, fit)
        try:
            space = space or read_space(fetched)
            output = folder / f"{Path(name).stem}_features.h5"
            channels = write_feature_file(output, fetched, spec)
        finally:
            fetched.unlink(missing_ok=True)
        mapped = None
        if scribbles:
            mapped = np.searchsorted(values, scribbles[number]).astype(np.uint8) + 1
            mapped[scribbles[number] == 0] = 0
        lanes.append(Lane(output.name, "features", (len(channels), *image.shape[:2]), axistags("cyx"), Path(name).stem, mapped))
        files.append(output)
    if progress:
        progress("images", len(images), len(images))
    (folder / SPACE_FILE).write_text(space)
    (folder / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    return write_project(folder / f"{project_name}.ilp", lanes, names), files


def batch_features(client: FeatureClient, folder: Path, images: list[tuple[str, np.ndarray]],
                   progress: Progress | None = None) -> list[Path]:
    """Feature files for new images with the project's stored feature set and space."""
    if not (folder / SPEC_FILE).exists() or not (folder / SPACE_FILE).exists():
        raise DinofeatError(f"{folder} is not a dinofeat ilastik project folder (no {SPEC_FILE} or {SPACE_FILE}); "
                            "create it with `dinofeat ilastik`.")
    spec = IlastikSpec(**json.loads((folder / SPEC_FILE).read_text()))
    space = (folder / SPACE_FILE).read_text()
    files = []
    for number, (name, image) in enumerate(images):
        check_2d(image, name)
        if progress:
            progress("images", number, len(images))
        fetched = fetch_in_space(client, image, Path(name).stem, folder, spec, progress, space)
        try:
            output = folder / f"{Path(name).stem}_features.h5"
            write_feature_file(output, fetched, spec)
            files.append(output)
        finally:
            fetched.unlink(missing_ok=True)
    if progress:
        progress("images", len(images), len(images))
    return files


__all__ = ["IlastikSpec", "build_project", "batch_features", "headless_command", "QUANTISATIONS"]
