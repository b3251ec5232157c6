"""Feature spaces as they travel with the data: the HDF5 group /feature_space and model files.

The server fits a feature space (input range, PCA, per-channel scaling; see the server's
`engine/space.py`) and sends it as JSON in the dataset header. The client stores it in every feature
file as the group `/feature_space`: the exact JSON (dataset `json`, what `--like` reads back) beside
plain float32 datasets `mean`, `components`, `shift`, `scale` and attributes `input_range` and
`identity`, so h5py users can read the basis without dinofeat. Model files (.dfm) carry the same JSON
in their metadata.
"""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np

from .errors import DinofeatError

SPACE_GROUP = "feature_space"


def space_array(value: dict | None) -> np.ndarray | None:
    """A float32 array of the space JSON (base64 little-endian float32 with its shape)."""
    if value is None:
        return None
    return np.frombuffer(base64.b64decode(value["float32_base64"]), dtype="<f4").reshape(value["shape"])


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


def read_space(path: str | Path) -> str:
    """The feature space JSON stored with a feature file (.h5), a model file (.dfm) or an OME-Zarr store that
    dinofeat wrote (.zarr, a folder), for --like."""
    path = Path(path)
    if path.is_dir():
        return zarr_store_space(path)
    if not path.is_file():
        raise DinofeatError(f"cannot read {path}: no such file; --like takes a feature file (.h5) or a model (.dfm).")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read("metadata.json"))
        except (zipfile.BadZipFile, KeyError, ValueError):
            raise DinofeatError(f"{path} is not a dinofeat model file; --like takes a feature file (.h5) or a model (.dfm).") from None
        if not metadata.get("feature_space"):
            raise DinofeatError(f"the model {path} stores no feature space (an older model file); train it again with this dinofeat.")
        return json.dumps(metadata["feature_space"], sort_keys=True)
    try:
        with h5py.File(path, "r") as f:
            if SPACE_GROUP not in f:
                raise DinofeatError(f"{path} holds no feature space (written by an older dinofeat or another program); "
                                    "compute its features again with this dinofeat.")
            text = f[SPACE_GROUP]["json"][()]
    except OSError:
        raise DinofeatError(f"{path} is neither an HDF5 feature file nor a dinofeat model; --like takes one of those.") from None
    return text.decode() if isinstance(text, bytes) else str(text)


def zarr_store_space(path: Path) -> str:
    """The feature space JSON in the "dinofeat" attributes of a complete OME-Zarr store (read as JSON: no zarr needed)."""
    try:
        stored = json.loads((path / ".zattrs").read_text()).get("dinofeat", {})
    except (OSError, ValueError, AttributeError):
        stored = {}
    if not stored.get("feature_space"):
        raise DinofeatError(f"{path} is not an OME-Zarr store that dinofeat wrote; --like takes a feature file (.h5 or .zarr) "
                            "or a model (.dfm).")
    if not stored.get("complete"):
        raise DinofeatError(f"{path} is incomplete (its computation stopped); compute it again, or take --like from another.")
    return json.dumps(stored["feature_space"], sort_keys=True)
