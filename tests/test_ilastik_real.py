"""Our ilastik projects inside real ilastik (headless, built from ../shared/vendor by
../shared/tools/ilastik/install.sh into ~/.cache/dinofeat-ilastik: about 2.5-4 minutes the first
time, seconds after). The commands are the ones `dinofeat ilastik` prints, as a user copies them."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import dinofeat
from dinofeat_client.metrics import mean_iou
from ilastik_install import ilastik_launcher

CLASS_VALUES = (85, 170, 255)


@pytest.fixture(scope="module")
def run_ilastik() -> Path:
    """ilastik's headless launcher, installed (or found installed) by the vendored install script."""
    return ilastik_launcher()


def class_map_of(probabilities_file: Path) -> np.ndarray:
    """The class values of the most probable class of an ilastik probabilities export (axes from its axistags)."""
    with h5py.File(probabilities_file, "r") as f:
        data = f["exported_data"]
        axes = [axis["key"] for axis in json.loads(data.attrs["axistags"])["axes"]]
        probabilities = np.squeeze(np.moveaxis(data[()], axes.index("c"), 0))
    return np.asarray(CLASS_VALUES)[np.argmax(probabilities, axis=0)]


def test_real_ilastik_trains_our_project_and_predicts_a_new_image_with_the_printed_command(
        run_ilastik, isb_three_phase, server_address, tmp_path):
    made = dinofeat("ilastik", str(isb_three_phase / "image.tif"), "-o", "proj", "--labels", str(isb_three_phase / "scribbles.tif"),
                    "--set", "classical", "--server", server_address, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    tifffile.imwrite(tmp_path / "new.tif", tifffile.imread(isb_three_phase / "image.tif"))
    batch = dinofeat("ilastik", "--batch", "proj", "new.tif", "--server", server_address, cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr
    command = shlex.split(batch.stdout.strip().splitlines()[-1])
    assert command[0] == "./run_ilastik.sh" and "--headless" in command
    predicted = subprocess.run([str(run_ilastik), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert "Training complete" in predicted.stdout + predicted.stderr  # from the project's scribbles
    (output,) = (tmp_path / "proj").glob("new*_Probabilities.h5")
    score = mean_iou(class_map_of(output), tifffile.imread(isb_three_phase / "ground_truth.tif"))
    print(f"mIoU inside ilastik with our classical features: {score:.3f} ({output.name})")
    assert score >= 0.6  # measured 0.61-0.62; ilastik's own 37 features reach 0.64 (issue 13 is to close that gap)
