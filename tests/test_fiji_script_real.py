"""The shipped Fiji script (fiji_macros/scripts/Plugins/dinofeat/DINOv2_Features_TWS.py) run unchanged inside
real Trainable Weka Segmentation: Debian's Jython on the vendored Fiji.app's jars, its `#@` parameters set
by tests/jvm/run_fiji_script.py as SciJava would set them, features from a real dinofeat server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import ROOT
from dinofeat_client.fiji.jvm import FIJI_JVM_OPTIONS, fiji_jars
from dinofeat_client.metrics import mean_iou
from test_fiji_bridge import FIJI_DIR, JYTHON_JAR, SEED, tws_miou_with_its_own_features

SCRIPT = ROOT / "fiji_macros" / "scripts" / "Plugins" / "dinofeat" / "DINOv2_Features_TWS.py"
LIBRARY = ROOT / "fiji_macros" / "jars" / "Lib"
CLASSES = [85, 170, 255]  # the scribbles' values, TWS's classes in this order


def why_no_fiji_script_run() -> str | None:
    """One sentence naming what this machine lacks to run the script in TWS, or None."""
    if not os.path.exists(JYTHON_JAR):
        return f"{JYTHON_JAR} is missing: `./dev test` installs Debian's jython"
    if shutil.which("java") is None:
        return "java is not on PATH: `./dev test` installs Debian's Java with jython"
    if not FIJI_DIR:
        return ("FIJI_DIR is not set: these tests need a local Fiji.app with Trainable Weka Segmentation "
                "(`./dev test` unpacks ../shared/vendor/fiji/Fiji.app.tar.gz when it is there)")
    if not list(Path(FIJI_DIR).glob("plugins/Trainable_Segmentation*.jar")):
        return f"{FIJI_DIR} has no plugins/Trainable_Segmentation*.jar, so no Trainable Weka Segmentation to run the script in"
    return None


pytestmark = pytest.mark.skipif(why_no_fiji_script_run() is not None, reason=str(why_no_fiji_script_run()))


def run_script(folder: Path, values: dict) -> tuple[dict, Path]:
    """Run the shipped script with these parameter values (seeded forest) in a JVM of its own; its report and result."""
    folder.mkdir()
    (folder / "tmp").mkdir()  # java.io.tmpdir: where the script puts the image it sends and the features it gets
    settings = {"values": values, "seed": SEED, "result": str(folder / "result.tif")}
    (folder / "settings.json").write_text(json.dumps(settings))
    classpath = ":".join([JYTHON_JAR, *fiji_jars(Path(FIJI_DIR))])
    command = ["java", *FIJI_JVM_OPTIONS, f"-Djava.io.tmpdir={folder / 'tmp'}", "-cp", classpath, "org.python.util.jython",
               str(ROOT / "tests" / "jvm" / "run_fiji_script.py"), str(SCRIPT), str(LIBRARY), str(folder / "settings.json"),
               str(folder / "report.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert report["result"] is not None, "the script showed no image: " + run.stdout[-2000:]
    return report, folder / "result.tif"


@pytest.fixture(scope="module")
def trained(isb_three_phase, server_address, tmp_path_factory):
    """The script as a user runs it first: multiscale features from the server, examples from the scribbles as
    a label image, a classifier saved, a class map shown."""
    folder = tmp_path_factory.mktemp("fiji_script") / "train"
    dinofeat = shutil.which("dinofeat", path=str(Path(sys.executable).parent)) or "dinofeat"
    report, result = run_script(folder, {
        "image": str(isb_three_phase / "image.tif"), "dinofeat": dinofeat, "server": server_address, "feature_set": "multiscale",
        "preset": "default", "feature_file": None, "examples": "Label image", "label_image": str(isb_three_phase / "scribbles.tif"),
        "load_classifier": None, "save_classifier": str(folder / "tws.model"), "probabilities": False})
    return folder, report, result


def test_the_shipped_script_trains_tws_on_our_multiscale_features_as_well_as_tws_on_its_own(trained, isb_three_phase, tmp_path):
    pytest.importorskip("jpype", reason="JPype is missing: `./dev test` installs it with the dev extra (TWS's own features run through it)")
    folder, report, result = trained
    fetched = sorted((folder / "tmp").glob("dinofeat_features_*.h5"))
    assert len(fetched) == 1
    with h5py.File(fetched[0], "r") as f:
        names = [str(n) for n in f["features"].attrs["channel_names"].astype(str)]
        assert f["features"].shape == (53, 512, 512)
    [segmentation] = report["segmentations"]
    assert segmentation["features"] == 53 and segmentation["feature_labels"] == names  # TWS trained on ours, not its own
    assert segmentation["class_labels"] == [str(v) for v in CLASSES] and segmentation["seed"] == SEED
    assert (folder / "tws.model").stat().st_size > 0
    assert report["result"]["title"] == "classes of image.tif"
    assert (report["result"]["bit_depth"], report["result"]["slices"]) == (8, 1)
    classes = tifffile.imread(result)
    assert classes.shape == (512, 512) and set(np.unique(classes)) == {0, 1, 2}  # TWS's class indices
    truth = tifffile.imread(isb_three_phase / "ground_truth.tif")
    ours = mean_iou(np.asarray(CLASSES, np.uint8)[classes], truth)
    own = tws_miou_with_its_own_features(isb_three_phase / "image.tif", isb_three_phase / "scribbles.tif",
                                         isb_three_phase / "ground_truth.tif", tmp_path)
    print(f"mIoU inside TWS through the shipped Fiji script: our multiscale features {ours:.3f}, TWS's own features {own:.3f}")
    assert ours >= own - 0.01


def test_the_shipped_script_applies_a_saved_classifier_to_a_feature_file_as_probability_maps(trained, isb_three_phase):
    folder, _, classes = trained
    [features] = sorted((folder / "tmp").glob("dinofeat_features_*.h5"))
    report, result = run_script(folder.parent / "apply", {
        "image": str(isb_three_phase / "image.tif"), "dinofeat": "dinofeat-is-not-needed", "server": "", "feature_set": "multiscale",
        "preset": "default", "feature_file": str(features), "examples": "Label image", "label_image": None,
        "load_classifier": str(folder / "tws.model"), "save_classifier": None, "probabilities": True})
    assert report["result"]["title"] == "probabilities of image.tif"
    assert (report["result"]["bit_depth"], report["result"]["slice_labels"]) == (32, [str(v) for v in CLASSES])
    assert not list((folder.parent / "apply" / "tmp").iterdir())  # the given feature file was used, nothing computed
    probabilities = tifffile.imread(result)
    assert probabilities.shape == (3, 512, 512)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), tifffile.imread(classes))  # the same classifier, the same classes
