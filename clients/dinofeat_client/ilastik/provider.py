"""Feature files for ilastik, all in one feature space: the server computes the stacks; the PCA basis
(and the per-channel scaling) are fitted once on the project's images and stored in the project
folder, so images added later with `--batch` land in the same space.

Project folder:
    <name>.ilp                the Pixel Classification project (see project.py)
    <image>_features.h5       one per image: dataset `features` (C, Y, X), chunks (C, 64, 64), axistags c,y,x
    dinofeat_ilastik.json     feature set, options, quantisation, channel names
    dinofeat_basis.h5         PCA mean and components, per-channel low/high
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
from ..wire import DEFAULT_BACKBONE, DEFAULT_PRESET, axistags
from .project import Lane, headless_command, write_project

SPEC_FILE = "dinofeat_ilastik.json"
BASIS_FILE = "dinofeat_basis.h5"
ILASTIK_CHUNK = 64
ROWS_PER_BLOCK = 256
"""Rows read at a time: one row of the streamed files' 256 x 256 chunks, so each chunk is read once."""
PCA_SAMPLE_PIXELS = 50_000
QUANTISATIONS = {"float32": None, "uint8": 255, "uint16": 65535}


@dataclass(frozen=True)
class IlastikSpec:
    """How the project's features are made; stored with the project."""

    feature_set: str = "hybrid"
    backbone: str = DEFAULT_BACKBONE
    preset: str = DEFAULT_PRESET
    pca: int = 48
    quantise: str = "float32"

    def parts(self) -> list[str]:
        """Server sets to fetch: the deep part without PCA (the basis is fitted here), then the classical part."""
        return {"hybrid": ["dinov2", "classical"], "dinov2": ["dinov2"], "attention": ["attention"],
                "classical": ["classical"]}[self.feature_set]


@dataclass
class Basis:
    """PCA of the first part (mean, components) and per-channel low/high of the final channels."""

    mean: np.ndarray | None
    components: np.ndarray | None
    low: np.ndarray
    high: np.ndarray

    def save(self, path: Path) -> None:
        with h5py.File(path, "w") as f:
            for name in ("low", "high"):
                f[name] = getattr(self, name)
            if self.components is not None:
                f["pca_mean"], f["pca_components"] = self.mean, self.components

    @classmethod
    def load(cls, path: Path) -> Basis:
        with h5py.File(path, "r") as f:
            pca = "pca_components" in f
            return cls(f["pca_mean"][()] if pca else None, f["pca_components"][()] if pca else None, f["low"][()], f["high"][()])


def fit_pca(raw_files: list[Path], components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top components (sorted by variance, sign fixed) of pixels sampled from the files' first part."""
    samples = []
    for path in raw_files:
        with h5py.File(path, "r") as f:
            data = f["features"]
            step = max(1, int(np.sqrt(data.shape[1] * data.shape[2] * len(raw_files) / PCA_SAMPLE_PIXELS)))
            for y0 in range(0, data.shape[1], ROWS_PER_BLOCK):  # whole chunk rows: h5py's strided reads are slow
                block = data[:, y0 : y0 + ROWS_PER_BLOCK][:, (-y0) % step :: step, ::step]
                samples.append(block.reshape(data.shape[0], -1))
    pixels = np.concatenate(samples, axis=1).astype(np.float32)
    mean = pixels.mean(axis=1, dtype=np.float64).astype(np.float32)
    centred = pixels - mean[:, None]
    covariance = (centred @ centred.T).astype(np.float64) / max(centred.shape[1] - 1, 1)
    variance, vectors = np.linalg.eigh(covariance)
    order = np.argsort(variance)[::-1][:components]
    vectors = vectors[:, order].T
    vectors *= np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(axis=1)])[:, None]
    return mean.astype(np.float32), vectors.astype(np.float32)


def project_rows(raw_files: list[Path], basis: Basis, y0: int, y1: int) -> np.ndarray:
    """Channels of rows y0:y1: the first part through the PCA, the other parts as they are."""
    blocks = []
    for number, path in enumerate(raw_files):
        with h5py.File(path, "r") as f:
            block = f["features"][:, y0:y1]
        if number == 0 and basis.components is not None:
            c, h, w = block.shape
            block = (basis.components @ (block.reshape(c, -1) - basis.mean[:, None])).reshape(-1, h, w)
        blocks.append(block.astype(np.float32))
    return np.concatenate(blocks)


def channel_range(raw_files: list[list[Path]], basis: Basis, height: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and maximum over the given images."""
    low, high = None, None
    for files, rows in zip(raw_files, height):
        for y0 in range(0, rows, ROWS_PER_BLOCK):
            block = project_rows(files, basis, y0, min(y0 + ROWS_PER_BLOCK, rows))
            block_low, block_high = block.min(axis=(1, 2)), block.max(axis=(1, 2))
            low = block_low if low is None else np.minimum(low, block_low)
            high = block_high if high is None else np.maximum(high, block_high)
    return low, high


def write_feature_file(path: Path, raw_files: list[Path], basis: Basis, spec: IlastikSpec, names: list[str],
                       shape: tuple[int, int]) -> None:
    """The ilastik feature file: scaled by the basis's low/high where the set asks for it, quantised on request."""
    height, width = shape
    scale = spec.feature_set == "hybrid" or spec.quantise != "float32"
    top = QUANTISATIONS[spec.quantise]
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as f:
        data = f.create_dataset("features", shape=(len(names), height, width), dtype=spec.quantise,
                                chunks=(len(names), min(ILASTIK_CHUNK, height), min(ILASTIK_CHUNK, width)),
                                compression="gzip", compression_opts=1, shuffle=True)
        data.attrs["axistags"] = axistags("cyx")
        data.attrs.create("channel_names", np.array(names, dtype=object), dtype=h5py.string_dtype())
        data.attrs["dinofeat_spec"] = json.dumps(asdict(spec))
        if scale:
            data.attrs["scale_low"], data.attrs["scale_high"] = basis.low, basis.high
        for y0 in range(0, height, ROWS_PER_BLOCK):
            y1 = min(y0 + ROWS_PER_BLOCK, height)
            block = project_rows(raw_files, basis, y0, y1)
            if scale:
                block = (block - basis.low[:, None, None]) / np.maximum(basis.high - basis.low, 1e-12)[:, None, None]
            if top is not None:
                block = np.clip(np.round(block * top), 0, top)
            data[:, y0:y1] = block.astype(spec.quantise)
    partial.replace(path)


def fetch_parts(client: FeatureClient, image: np.ndarray, stem: str, folder: Path, spec: IlastikSpec,
                progress: Progress | None) -> list[Path]:
    """The server's stacks for one image, in temporary files of the project folder."""
    files = []
    for part in spec.parts():  # no PCA on the server: the project's own basis is applied here
        path = folder / f".{stem}.{part}.h5"
        client.fetch_features(image, path, part, compression="none", progress=progress, backbone=spec.backbone,
                              preset=spec.preset)  # temporary: no deflate on either side
        files.append(path)
    return files


def channel_names(raw_files: list[Path], basis: Basis) -> list[str]:
    names = []
    for number, path in enumerate(raw_files):
        with h5py.File(path, "r") as f:
            part = [str(n) for n in f["features"].attrs["channel_names"]]
        if number == 0 and basis.components is not None:
            part = [f"dino_pca_{i:02d}" if "dino" in part[0] or "attn" in part[0] else f"pca_{i:02d}" for i in range(len(basis.components))]
        names += part
    return names


def check_2d(image: np.ndarray, name: str) -> None:
    if image_axes(image) not in ("yx", "yxc"):
        raise DinofeatError(f"{name} is a stack; the ilastik provider writes 2-D projects, so give its slices as separate images.")


def build_project(client: FeatureClient, images: list[tuple[str, np.ndarray]], folder: Path, spec: IlastikSpec,
                  scribbles: list[np.ndarray] | None = None, classes: list[str] | None = None,
                  project_name: str = "dinofeat", progress: Progress | None = None) -> tuple[Path, list[Path]]:
    """Feature files for every image, the stored basis and spec, and the .ilp project; returns (project, files)."""
    for name, image in images:
        check_2d(image, name)
    values = sorted({int(v) for s in scribbles or [] for v in np.unique(s) if v != 0})
    names = classes or [f"class {v}" for v in values] or ["Label 1", "Label 2"]
    if scribbles and classes and len(classes) != len(values):
        raise DinofeatError(f"the scribbles hold {len(values)} classes ({', '.join(map(str, values))}) but {len(classes)} names were given.")
    raw = [fetch_parts(client, image, Path(name).stem, folder, spec, progress) for name, image in images]
    try:
        mean = components = None
        if spec.pca:
            mean, components = fit_pca([files[0] for files in raw], spec.pca)
        basis = Basis(mean, components, np.zeros(0, np.float32), np.zeros(0, np.float32))
        basis.low, basis.high = channel_range(raw, basis, [image.shape[0] for _, image in images])
        basis.save(folder / BASIS_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
        files, lanes = [], []
        for number, ((name, image), parts) in enumerate(zip(images, raw)):
            output = folder / f"{Path(name).stem}_features.h5"
            channels = channel_names(parts, basis)
            write_feature_file(output, parts, basis, spec, channels, image.shape[:2])
            mapped = None
            if scribbles:
                mapped = np.searchsorted(values, scribbles[number]).astype(np.uint8) + 1
                mapped[scribbles[number] == 0] = 0
            lanes.append(Lane(output.name, "features", (len(channels), *image.shape[:2]), axistags("cyx"), Path(name).stem, mapped))
            files.append(output)
    finally:
        for files_of_image in raw:
            for path in files_of_image:
                path.unlink(missing_ok=True)
    return write_project(folder / f"{project_name}.ilp", lanes, names), files


def batch_features(client: FeatureClient, folder: Path, images: list[tuple[str, np.ndarray]],
                   progress: Progress | None = None) -> list[Path]:
    """Feature files for new images with the project's stored feature set, PCA basis and scaling."""
    if not (folder / SPEC_FILE).exists() or not (folder / BASIS_FILE).exists():
        raise DinofeatError(f"{folder} is not a dinofeat ilastik project folder (no {SPEC_FILE}); create it with `dinofeat ilastik`.")
    spec = IlastikSpec(**json.loads((folder / SPEC_FILE).read_text()))
    basis = Basis.load(folder / BASIS_FILE)
    files = []
    for name, image in images:
        check_2d(image, name)
        parts = fetch_parts(client, image, Path(name).stem, folder, spec, progress)
        try:
            output = folder / f"{Path(name).stem}_features.h5"
            write_feature_file(output, parts, basis, spec, channel_names(parts, basis), image.shape[:2])
            files.append(output)
        finally:
            for path in parts:
                path.unlink(missing_ok=True)
    return files


__all__ = ["IlastikSpec", "build_project", "batch_features", "headless_command", "QUANTISATIONS"]
