"""Write an ilastik Pixel Classification project (.ilp, an HDF5 file) around feature files.

The layout follows what ilastik 1.4 reads (shared/docs/ILASTIK.md): one lane per image whose raw
data is our feature file (relative path, `features` dataset, axes c,y,x); feature selection set to
Gaussian smoothing at 0.3 only, so each channel becomes one feature; class names and colours; the
user's scribbles as label blocks, so ilastik trains as soon as the project is opened. The trained
classifier is left to ilastik (headless.store_classifier). `check_project` tells an existing project
from a damaged or foreign .ilp.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.errors import DinofeatError

ILASTIK_VERSION = "1.4.1"
FEATURE_IDS = ["GaussianSmoothing", "LaplacianOfGaussian", "GaussianGradientMagnitude", "DifferenceOfGaussians",
               "StructureTensorEigenvalues", "HessianOfGaussianEigenvalues"]
SCALES = [0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0]
COLOURS = [(255, 225, 25), (0, 130, 200), (230, 25, 75), (60, 180, 75), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
TRAINING_APPLET = 2
CLASSIFIER_GROUP = "PixelClassification/ClassifierForests"
"""Where ilastik stores a trained random forest (we never write one: ilastik does, see headless.py)."""


@dataclass(frozen=True)
class Lane:
    """One image of the project: its feature file (relative to the project folder) and optional scribbles."""

    feature_file: str
    dataset: str
    shape: tuple[int, ...]
    axistags: str
    nickname: str
    scribbles: np.ndarray | None = None  # (Y, X) values 1..N, 0 unlabelled


def ascii_array(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values])


def label_block(scribbles: np.ndarray) -> tuple[np.ndarray, str] | None:
    """The scribbles' bounding box as an ilastik label block (h, w, 1) and its blockSlice."""
    rows, cols = np.nonzero(scribbles)
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    return scribbles[y0:y1, x0:x1, None].astype(np.uint8), f"[{y0}:{y1},{x0}:{x1},0:1]"


def write_project(path: Path, lanes: list[Lane], class_names: list[str]) -> Path:
    """Write the .ilp at `path` (through a temporary file; the feature files must already exist)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            f["ilastikVersion"] = ILASTIK_VERSION.encode()
            f["workflowName"] = b"Pixel Classification"
            f["time"] = time.ctime().encode()
            f["currentApplet"] = np.int64(TRAINING_APPLET)
            inputs = f.create_group("Input Data")
            inputs["StorageVersion"] = b"0.2"
            inputs["Role Names"] = ascii_array(["Raw Data", "Prediction Mask"])
            inputs.create_group("local_data")
            for number, lane in enumerate(lanes):
                group = inputs.create_group(f"infos/lane{number:04d}")
                group.create_group("Prediction Mask")
                raw = group.create_group("Raw Data")
                raw["filePath"] = f"{lane.feature_file}/{lane.dataset.lstrip('/')}".encode()
                raw["allowLabels"] = True
                raw["nickname"] = lane.nickname.encode()
                raw["axistags"] = lane.axistags.encode()
                raw["shape"] = np.array(lane.shape, dtype=np.int64)
                raw["location"] = b"FileSystem"
                raw["datasetId"] = str(uuid.uuid1()).encode()
                raw["__class__"] = b"RelativeFilesystemDatasetInfo"
                raw["display_mode"] = b"default"
                raw["normalizeDisplay"] = False
            selections = f.create_group("FeatureSelections")
            selections["StorageVersion"] = b"0.1"
            selections["FeatureIds"] = ascii_array(FEATURE_IDS)
            selections["Scales"] = np.array(SCALES, dtype=np.float64)
            matrix = np.zeros((len(FEATURE_IDS), len(SCALES)), dtype=bool)
            matrix[0, 0] = True  # Gaussian smoothing at 0.3: near identity, one feature per channel
            selections["SelectionMatrix"] = matrix
            selections["ComputeIn2d"] = np.ones(len(SCALES), dtype=bool)
            classification = f.create_group("PixelClassification")
            classification["StorageVersion"] = b"0.1"
            colours = np.array([COLOURS[i % len(COLOURS)] for i in range(len(class_names))], dtype=np.int64)
            for name, data in (("LabelNames", ascii_array(class_names)), ("LabelColors", colours), ("PmapColors", colours)):
                classification[name] = data
                classification[name].attrs["isEmpty"] = False
            label_sets = classification.create_group("LabelSets")
            for number, lane in enumerate(lanes):
                lane_labels = label_sets.create_group(f"labels{number:03d}")
                block = label_block(lane.scribbles) if lane.scribbles is not None else None
                if block is not None:
                    lane_labels["block0000"] = block[0]
                    lane_labels["block0000"].attrs["blockSlice"] = block[1]
                    lane_labels["block0000"].attrs["axistags"] = json.dumps({"axes": [
                        {"key": k, "typeFlags": t, "resolution": 0, "description": ""} for k, t in (("y", 2), ("x", 2), ("c", 1))]})
    except BaseException:  # nothing half-written stays behind
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


@dataclass(frozen=True)
class ProjectState:
    """What an existing project holds, as far as the batch command needs to know."""

    labelled: bool  # some lane has label blocks
    classifier: bool  # ilastik stored a trained classifier (CLASSIFIER_GROUP)


def check_project(path: Path) -> ProjectState:
    """Refuse, in one sentence, a file that is not an ilastik Pixel Classification project; what it holds otherwise."""
    made_by = "a project made by `dinofeat ilastik IMAGES -o FOLDER`"
    if not path.is_file():
        raise DinofeatError(f"{path}: no such project file; give {made_by}, or its folder.")
    try:
        with h5py.File(path, "r") as f:
            workflow = f["workflowName"][()] if isinstance(f.get("workflowName"), h5py.Dataset) else None
            workflow = workflow.decode(errors="replace") if isinstance(workflow, bytes) else workflow
            if workflow != "Pixel Classification":
                what = f"an ilastik {workflow} project" if workflow else "HDF5 but not an ilastik project (no workflowName)"
                raise DinofeatError(f"{path} is {what}; dinofeat's features go into Pixel Classification projects: give {made_by}.")
            label_sets = f.get("PixelClassification/LabelSets")
            labelled = isinstance(label_sets, h5py.Group) and any(
                isinstance(lane, h5py.Group) and len(lane) > 0 for lane in label_sets.values())
            return ProjectState(labelled, CLASSIFIER_GROUP in f)
    except OSError:
        raise DinofeatError(f"{path} is not an ilastik project: it cannot be read as HDF5 (damaged or only partly "
                            f"copied?); give {made_by}.") from None
