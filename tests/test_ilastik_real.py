"""Our ilastik projects inside real ilastik (headless, built from ../shared/vendor by
../shared/tools/ilastik/install.sh into ~/.cache/dinofeat-ilastik: about 2.5-4 minutes the first
time, seconds after). The commands are the ones `dinofeat ilastik` prints, as a user copies them: run from
ilastik's folder, as their ./run_ilastik.sh says (the paths in them are absolute)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import dinofeat
from dinofeat_client.ilastik.headless import exported_class_map
from dinofeat_client.metrics import mean_iou
from ilastik_install import ilastik_launcher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # noqa: E402  (the project on ilastik's own features that bench_peers.py measures)

CLASS_VALUES = (85, 170, 255)


@pytest.fixture(scope="module")
def run_ilastik() -> Path:
    """ilastik's headless launcher, installed (or found installed) by the vendored install script."""
    return ilastik_launcher()


def class_map_of(probabilities_file: Path) -> np.ndarray:
    """The class values of the most probable class of an ilastik probabilities export."""
    return exported_class_map(probabilities_file, list(CLASS_VALUES))


@dataclass(frozen=True)
class HeadlessRun:
    """One run of the headless command `dinofeat ilastik --batch` printed, as a user copies it."""

    folder: Path  # where the user ran dinofeat
    log: str  # ilastik's stdout and stderr
    seconds: float

    def probabilities(self) -> Path:
        return self.folder / "proj" / "new_Probabilities.h5"


def project_and_batch(folder: Path, isb: Path, server: str, *extra: str, feature_set: str = "classical") -> tuple[list[str], str]:
    """`dinofeat ilastik image.tif -o proj --labels scribbles.tif --set SET [extra]`, then `--batch proj new.tif`
    (a copy of the image): the headless command the batch printed, split as a shell would, and all it printed."""
    made = dinofeat("ilastik", str(isb / "image.tif"), "-o", "proj", "--labels", str(isb / "scribbles.tif"),
                    "--set", feature_set, "--server", server, *extra, cwd=folder)
    assert made.returncode == 0, made.stderr
    tifffile.imwrite(folder / "new.tif", tifffile.imread(isb / "image.tif"))
    batch = dinofeat("ilastik", "--batch", "proj", "new.tif", "--server", server, cwd=folder)
    assert batch.returncode == 0, batch.stderr
    command = shlex.split(batch.stdout.strip().splitlines()[-1])
    assert command[0] == "./run_ilastik.sh" and "--headless" in command
    return command, batch.stdout


def run_headless(launcher: Path, command: list[str], folder: Path) -> HeadlessRun:
    """The printed command with ilastik's launcher in place of ./run_ilastik.sh, run from ilastik's folder (absolute paths)."""
    start = time.perf_counter()
    done = subprocess.run([str(launcher), *command[1:]], cwd=launcher.parent, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return HeadlessRun(folder, done.stdout + done.stderr, seconds)


@pytest.fixture(scope="module")
def retraining_run(run_ilastik, isb_three_phase, server_address, tmp_path_factory) -> HeadlessRun:
    """A project with scribbles and no stored classifier: ilastik trains at the start of the run."""
    folder = tmp_path_factory.mktemp("retraining")
    return run_headless(run_ilastik, project_and_batch(folder, isb_three_phase, server_address)[0], folder)


@pytest.fixture(scope="module")
def stored_project(run_ilastik, isb_three_phase, server_address, tmp_path_factory) -> tuple[Path, list[str]]:
    """A project whose classifier real ilastik trained and stored (`--ilastik`); the folder and the printed command."""
    folder = tmp_path_factory.mktemp("stored")
    return folder, project_and_batch(folder, isb_three_phase, server_address, "--ilastik", str(run_ilastik))[0]


@pytest.fixture(scope="module")
def stored_runs(run_ilastik, stored_project) -> list[HeadlessRun]:
    """Two runs of the printed command with the stored classifier, their probabilities kept apart."""
    folder, command = stored_project
    runs = []
    for number in range(2):
        runs.append(run_headless(run_ilastik, command, folder))
        runs[-1].probabilities().rename(folder / f"run{number}.h5")
    return [HeadlessRun(folder, run.log, run.seconds) for run in runs]


def test_real_ilastik_trains_our_project_and_predicts_a_new_image_with_the_printed_command(retraining_run, isb_three_phase):
    assert "Training complete" in retraining_run.log  # from the project's scribbles
    assert "Your project file has no classifier." in retraining_run.log
    score = mean_iou(class_map_of(retraining_run.probabilities()), tifffile.imread(isb_three_phase / "ground_truth.tif"))
    print(f"mIoU inside ilastik with our classical features, retrained: {score:.3f} ({retraining_run.seconds:.1f} s)")
    assert score >= 0.6  # measured 0.60-0.63 over 9 runs (a new random forest each run); ilastik's own 37 features reach 0.64 (issue 13)


def test_a_headless_batch_run_names_its_result_after_the_image_beside_its_folder(retraining_run):
    results = sorted(p.relative_to(retraining_run.folder).as_posix() for p in retraining_run.folder.rglob("*_Probabilities.h5"))
    assert results == ["proj/new_Probabilities.h5"]  # ilastik's own naming would give new_features-features_Probabilities.h5
    with h5py.File(retraining_run.probabilities(), "r") as f:
        assert f["exported_data"].shape == (3, 512, 512)  # the input's axes, c,y,x


def test_the_project_stores_the_classifier_ilastik_trained_from_the_labels(stored_project):
    folder, _ = stored_project
    with h5py.File(folder / "proj" / "dinofeat.ilp", "r") as f:
        assert sorted(f["PixelClassification/ClassifierForests"]) == ["Forest0000", "Forest0001", "feature_names",
                                                                     "known_labels", "pickled_type"]
        assert list(f["PixelClassification/ClassifierForests/known_labels"][()]) == [1, 2, 3]
    assert sorted(p.name for p in (folder / "proj").iterdir()) == ["dinofeat.ilp", "dinofeat_ilastik.json",
                                                                   "dinofeat_space.json", "image", "new"]


def test_a_stored_classifier_predicts_without_retraining(stored_runs, retraining_run, isb_three_phase):
    for run in stored_runs:
        assert "Training complete" not in run.log and "Training new classifier" not in run.log
        assert "Your project file has no classifier." not in run.log  # logged whenever ilastik must train first
        assert "Prediction took" in run.log
    score = mean_iou(class_map_of(stored_runs[0].folder / "run0.h5"), tifffile.imread(isb_three_phase / "ground_truth.tif"))
    print(f"mIoU with the stored classifier: {score:.3f}; headless run {stored_runs[0].seconds:.1f} s and "
          f"{stored_runs[1].seconds:.1f} s, retraining {retraining_run.seconds:.1f} s")
    assert score >= 0.6  # the same forest as a retraining run, trained once


def test_a_stored_classifier_predicts_the_same_probabilities_every_run(stored_runs):
    with h5py.File(stored_runs[0].folder / "run0.h5", "r") as first, h5py.File(stored_runs[0].folder / "run1.h5", "r") as second:
        np.testing.assert_array_equal(first["exported_data"][()], second["exported_data"][()])


def test_the_printed_store_command_stores_the_classifier_that_predicted_while_it_trained(run_ilastik, isb_three_phase,
                                                                                        server_address, tmp_path):
    command, printed = project_and_batch(tmp_path, isb_three_phase, server_address)
    store = shlex.split(re.search(r"\(to store one: (.+)\)$", printed, re.MULTILINE).group(1))
    assert store[0] == "./run_ilastik.sh" and store[-2:] == ["--retrain", "--readonly=false"]
    trained = run_headless(run_ilastik, [*store, *command[3:]], tmp_path)  # trains, stores, and predicts the new image
    assert "Training complete" in trained.log
    trained.probabilities().rename(tmp_path / "while_training.h5")
    stored = run_headless(run_ilastik, command, tmp_path)
    assert "Training complete" not in stored.log
    with h5py.File(tmp_path / "while_training.h5", "r") as first, h5py.File(stored.probabilities(), "r") as second:
        np.testing.assert_array_equal(first["exported_data"][()], second["exported_data"][()])


RUNS = 3
"""Runs of each project: ilastik does not seed its forest, so one run's mIoU moves by about 0.005."""


def test_inside_ilastik_our_multiscale_features_reach_ilastik_own_37_features(run_ilastik, isb_three_phase, server_address,
                                                                            tmp_path):
    truth = tifffile.imread(isb_three_phase / "ground_truth.tif")
    command, _ = project_and_batch(tmp_path, isb_three_phase, server_address, feature_set="multiscale")
    ours = [mean_iou(class_map_of(run_headless(run_ilastik, command, tmp_path).probabilities()), truth) for _ in range(RUNS)]
    image, scribbles = tifffile.imread(isb_three_phase / "image.tif"), tifffile.imread(isb_three_phase / "scribbles.tif")
    own = [mean_iou(peers.ilastik_own(image, scribbles, tmp_path).classes, truth) for _ in range(RUNS)]
    print(f"mIoU inside ilastik, {RUNS} runs each: our multiscale features {np.mean(ours):.3f} ({', '.join(f'{v:.3f}' for v in ours)}), "
          f"ilastik's own 37 features {np.mean(own):.3f} ({', '.join(f'{v:.3f}' for v in own)})")
    # measured in real ilastik: ours 0.650, its own 0.643 (3 runs each); in its forest emulated over 5 seeds
    # (bench_bank_choice): ours 0.646 +- 0.008, its own 0.644 +- 0.004. The margin
    # is two standard deviations of the difference of two means of 3 runs, so that a chance run does not fail
    assert np.mean(ours) >= np.mean(own) - 0.01
