"""Feature spaces as they travel with the data: the HDF5 group /feature_space and model files.

The server fits a feature space (input range, PCA, per-channel scaling; see the server's
`engine/space.py`) and sends it as JSON in the dataset header. The client stores it in every feature
file as the group `/feature_space`: the exact JSON (dataset `json`, what `--like` reads back) beside
plain float32 datasets `mean`, `components`, `shift`, `scale` and attributes `input_range` and
`identity`, so h5py users can read the basis without dinofeat. Model files (.dfm) carry the same JSON
in their metadata.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.computation import FeatureComputation, stored_computation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import space_array

SPACE_GROUP = "feature_space"


def write_space(file: h5py.File, space: dict) -> None:
    """Store a space (its JSON object) as the group /feature_space of an open HDF5 file."""
    group = file.create_group(SPACE_GROUP)
    group.create_dataset("json", data=json.dumps(space, sort_keys=True), dtype=h5py.string_dtype())
    group.attrs["format"] = space.get("format", "")
    group.attrs["identity"] = json.dumps(space.get("identity", {}), sort_keys=True)
    group.attrs["input_range"] = np.asarray(space.get("input_range", [0.0, 1.0]), dtype=np.float64)
    for name in ("mean", "components", "shift", "scale"):
        array = space_array(space.get(name))
        if array is not None:
            group.create_dataset(name, data=array)


@dataclass(frozen=True)
class Stored:
    """What a feature file, model or OME-Zarr store says about its features: the feature space JSON (what --like
    expresses new features in) and the whole computation (what a command adopts)."""

    space_json: str
    computation: FeatureComputation


def read_space(path: str | Path) -> str:
    """The feature space JSON stored with a feature file (.h5), a model file (.dfm) or an OME-Zarr store that
    dinofeat wrote (.zarr, a folder), for --like."""
    return read_stored(path).space_json


def read_stored(path: str | Path) -> Stored:
    """The feature space and computation stored with a feature file (.h5), a model file (.dfm) or an OME-Zarr store
    that dinofeat wrote (.zarr, a folder); files of an earlier dinofeat give the computation their spec implies."""
    path = Path(path)
    if path.is_dir():
        return zarr_store_space(path)
    if not path.is_file():
        raise DinofeatError(f"cannot read {path}: no such file; --like takes a feature file (.h5) or a model (.dfm).")
    if path.suffix == ".json":
        return description_file(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read("metadata.json"))
            metadata = metadata if isinstance(metadata, dict) else {}
        except (zipfile.BadZipFile, KeyError, ValueError):
            raise DinofeatError(f"{path} is not a dinofeat model file; --like takes a feature file (.h5) or a model (.dfm).") from None
        if not metadata.get("feature_space"):
            raise DinofeatError(f"the model {path} stores no feature space (an older model file); train it again with this dinofeat.")
        spec = {**as_dict(metadata.get("feature_spec")), "name": metadata.get("feature_set")}
        return Stored(json.dumps(metadata["feature_space"], sort_keys=True), described(metadata.get("computation"), spec, path))
    try:
        with h5py.File(path, "r") as f:
            if SPACE_GROUP not in f:
                raise DinofeatError(f"{path} holds no feature space (written by an older dinofeat or another program); "
                                    "compute its features again with this dinofeat.")
            text = f[SPACE_GROUP]["json"][()]
            attributes = f["features"].attrs if "features" in f else {}
            stored, spec = attributes.get("computation"), attributes.get("feature_set")
    except OSError:
        raise DinofeatError(f"{path} is neither an HDF5 feature file nor a dinofeat model; --like takes one of those.") from None
    return Stored(text.decode() if isinstance(text, bytes) else str(text), described(parsed(stored), parsed(spec), path))


def parsed(value) -> dict:
    """An attribute holding a JSON object, as a dict ({} when absent or not one)."""
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return as_dict(json.loads(value)) if isinstance(value, str) else {}
    except ValueError:
        return {}


def as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def described(stored: dict | None, spec: dict, path: Path) -> FeatureComputation:
    """The stored computation of `path` (see computation.stored_computation), or one sentence when it is not readable."""
    try:
        return stored_computation(stored, spec)
    except (DinofeatError, TypeError, ValueError):
        raise DinofeatError(f"{path} describes its features in a way this dinofeat does not read; update dinofeat, or "
                            "compute the features again.") from None


def description_file(path: Path) -> Stored:
    """The computation and space of a JSON description (`dinofeat fiji train` writes one beside each TWS classifier)."""
    try:
        stored = json.loads(path.read_text())
        return Stored(json.dumps(stored["feature_space"], sort_keys=True), described(as_dict(stored["computation"]), {}, path))
    except (OSError, ValueError, KeyError, TypeError):
        raise DinofeatError(f"{path} is not a dinofeat feature description; train the classifier again with dinofeat fiji train.") from None


def zarr_store_space(path: Path) -> Stored:
    """The feature space and computation in the "dinofeat" attributes of a complete OME-Zarr store (read as JSON: no
    zarr needed)."""
    try:
        stored = json.loads((path / ".zattrs").read_text()).get("dinofeat", {})
    except (OSError, ValueError, AttributeError):
        stored = {}
    if not stored.get("feature_space"):
        raise DinofeatError(f"{path} is not an OME-Zarr store that dinofeat wrote; --like takes a feature file (.h5 or .zarr) "
                            "or a model (.dfm).")
    if not stored.get("complete"):
        raise DinofeatError(f"{path} is incomplete (its computation stopped); compute it again, or take --like from another.")
    spec = as_dict(stored.get("feature_set"))
    return Stored(json.dumps(stored["feature_space"], sort_keys=True), described(as_dict(stored.get("computation")), spec, path))
