"""Real ilastik, headless: the batch command printed for users, and one run that trains the project's
classifier and stores it in the .ilp (what ilastik's GUI does when a project is saved after Live Update).

Read from ilastik 1.4.3's sources and checked in it (tests/test_ilastik_real.py):
- A batch input `d/x.h5/features` is nicknamed "x-features" (`DatasetInfo.create_nickname`: the file
  name without extension, "-", the internal path) and `{dataset_dir}` is its folder, d. The output name
  format knows only `{dataset_dir}`, `{nickname}`, `{result_type}` and the region keys (`{roi}`,
  `{x_start}`...); none of them is the file name alone. So every image's feature file is
  `<image>/features.h5` and the format `{dataset_dir}_{result_type}.h5` turns
  `proj/new01/features.h5/features` into `proj/new01_Probabilities.h5`.
- `--retrain --readonly=false` without input files trains from the labels stored in the project, saves
  the classifier (`PixelClassification/ClassifierForests`) and exports nothing
  (`PixelClassificationWorkflow._force_retrain_classifier`). A later batch run loads it and predicts
  without training: its log has no "Training complete" and no "Your project file has no classifier."
  Its predictions equal those of the run that trained it; two trainings differ (vigra's forest draws a
  new random seed each time).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np

from dinofeat.contract.errors import DinofeatError

from .project import CLASSIFIER_GROUP

ENV_LAUNCHER = "DINOFEAT_ILASTIK"
"""Environment variable naming ilastik's run_ilastik.sh when --ilastik is not given."""
OUTPUT_FORMAT = "{dataset_dir}_{result_type}.h5"
"""ilastik's --output_filename_format: proj/new01/features.h5/features -> proj/new01_Probabilities.h5."""


def launcher_from(given: str | None) -> Path | None:
    """ilastik's run_ilastik.sh from --ilastik, else from $DINOFEAT_ILASTIK; None when neither is set."""
    named = given or os.environ.get(ENV_LAUNCHER)
    if not named:
        return None
    path = Path(named).expanduser()
    if path.is_dir():
        path = path / "run_ilastik.sh"
    where = "--ilastik" if given else f"${ENV_LAUNCHER}"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise DinofeatError(f"{where} names {path}, which is not an executable file; give the path of run_ilastik.sh "
                            "in the folder ilastik was unpacked to.")
    return path.absolute()


def headless_command(project: Path, feature_files: list[Path], launcher: Path | None = None) -> str:
    """The ilastik batch command that predicts `feature_files` (`<image>/features.h5`) with `project`: absolute,
    quoted paths, so it runs as printed from any folder; writes `<image>_Probabilities.h5` beside each image's folder."""
    program = shlex.quote(str(launcher)) if launcher else "./run_ilastik.sh"
    inputs = " ".join(shlex.quote(f"{Path(p).absolute()}/features") for p in feature_files)
    return (f'{program} --headless --project={shlex.quote(str(Path(project).absolute()))} --export_source="Probabilities" '
            f'--output_format=hdf5 --output_filename_format="{OUTPUT_FORMAT}" --input_axes=cyx --raw_data {inputs}')


def training_command(project: Path, launcher: Path | None = None) -> str:
    """The ilastik command that trains `project`'s classifier from its labels and stores it in the project."""
    program = shlex.quote(str(launcher)) if launcher else "./run_ilastik.sh"
    return f"{program} --headless --project={shlex.quote(str(Path(project).absolute()))} --retrain --readonly=false"


def last_words(log: str) -> str:
    """The last line of ilastik's log that says something (errors end it), shortened to one line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]


def store_classifier(project: Path, launcher: Path) -> float:
    """Train the project's classifier from its labels in real ilastik and store it in `project`; the seconds it took.

    ilastik saves into a copy beside the project (`.<name>.training.ilp`, the same folder so the relative
    feature-file paths hold), which replaces the project only once it holds a classifier: a failed or
    interrupted run leaves the project as it was."""
    copy = project.with_name(f".{project.stem}.training.ilp")
    shutil.copyfile(project, copy)
    start = time.perf_counter()
    try:
        try:
            done = subprocess.run([str(launcher), "--headless", f"--project={copy.name}", "--retrain", "--readonly=false"],
                                  cwd=project.parent, capture_output=True, text=True)
        except OSError as error:
            raise DinofeatError(f"cannot run {launcher} ({error.strerror}); give the path of ilastik's run_ilastik.sh.") from None
        try:
            with h5py.File(copy, "r") as f:
                stored = CLASSIFIER_GROUP in f
        except OSError:  # ilastik died while saving
            stored = False
        if done.returncode != 0 or not stored:
            why = last_words(f"{done.stdout}\n{done.stderr}")
            raise DinofeatError(f"ilastik could not train the classifier of {project} (exit code {done.returncode}: "
                                f"{why}); the project is unchanged and ilastik will "
                                "train from its labels on its first run.")
        copy.replace(project)
    finally:
        copy.unlink(missing_ok=True)
    return time.perf_counter() - start


def exported_class_map(probabilities_file: Path, values: list[int]) -> np.ndarray:
    """The class values of the most probable class of an ilastik probabilities export (hdf5, dataset
    `exported_data`, axes from its axistags); ilastik's label k is the k-th of `values`."""
    with h5py.File(probabilities_file, "r") as f:
        data = f["exported_data"]
        axes = [axis["key"] for axis in json.loads(data.attrs["axistags"])["axes"]]
        probabilities = np.squeeze(np.moveaxis(data[()], axes.index("c"), 0))
    return np.asarray(values)[np.argmax(probabilities, axis=0)]
