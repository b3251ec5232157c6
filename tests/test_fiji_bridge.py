"""The Fiji side for real: our files read by JHDF5 and ImageJ1 (Debian's jars) through JPype and
through Jython running fiji_macros' library; the ARFF export; TWS itself when FIJI_DIR names a Fiji."""

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
from conftest import ROOT, dinofeat
from dinofeat_client.client import FeatureClient
from dinofeat_client.fiji.jvm import DEBIAN_JARS
from dinofeat_client.imagej_tiff import write_imagej_hyperstack
from dinofeat_client.metrics import mean_iou
from scipy.io import arff

JYTHON_JAR = "/usr/share/java/jython.jar"
missing_jars = [jar for jar in DEBIAN_JARS if not os.path.exists(jar)]
needs_imagej1 = pytest.mark.skipif(bool(missing_jars), reason=f"{', '.join(missing_jars)} missing: `./dev test` installs "
                                   "Debian's libij-java and libsis-jhdf5-java (needs root and apt-get)")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(5).random((70, 90)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def feature_files(image, server_address, tmp_path_factory) -> tuple[Path, Path]:
    """The classical features of `image` as HDF5 (from the server) and as an ImageJ hyperstack TIFF."""
    folder = tmp_path_factory.mktemp("fiji")
    with FeatureClient(server_address) as client:
        h5 = client.fetch_features(image, folder / "features.h5", "classical").path
    with h5py.File(h5, "r") as f:
        tiff = write_imagej_hyperstack(f["features"], folder / "features.tif")
    return h5, tiff


def features_of(h5: Path) -> tuple[np.ndarray, list[str]]:
    with h5py.File(h5, "r") as f:
        return f["features"][()], [str(n) for n in f["features"].attrs["channel_names"].astype(str)]


@pytest.fixture(scope="module")
def jvm():
    pytest.importorskip("jpype", reason="JPype is missing: `./dev test` installs it with the dev extra")
    if missing_jars:
        pytest.skip(f"{', '.join(missing_jars)} missing: `./dev test` installs Debian's libij-java and libsis-jhdf5-java")
    from dinofeat_client.fiji.jvm import start_imagej1

    start_imagej1()


def test_jhdf5_reads_our_feature_file_with_its_shape_values_and_channel_names(jvm, feature_files):
    import jpype
    from ch.systemsx.cisd.hdf5 import HDF5Factory

    features, names = features_of(feature_files[0])
    reader = HDF5Factory.openForReading(str(feature_files[0]))
    try:
        assert list(reader.object().getDataSetInformation("features").getDimensions()) == [58, 70, 90]
        assert json.loads(reader.string().getAttr("features", "channel_names_json")) == names
        assert json.loads(reader.string().getAttr("features", "axistags"))["axes"][0]["key"] == "c"
        for channel in (0, 17, 57):
            block = reader.float32().readMDArrayBlockWithOffset("features", jpype.JArray(jpype.JInt)([1, 70, 90]),
                                                                 jpype.JArray(jpype.JLong)([channel, 0, 0]))
            np.testing.assert_array_equal(np.array(block.getAsFlatArray(), np.float32).reshape(70, 90), features[channel])
    finally:
        reader.close()


def test_a_feature_file_becomes_an_imagestack_labelled_with_channel_names(jvm, feature_files):
    from dinofeat_client.fiji.imagestack import array_from_stack, stack_from_h5

    features, names = features_of(feature_files[0])
    stack = stack_from_h5(feature_files[0])
    assert (stack.getWidth(), stack.getHeight(), stack.getSize()) == (90, 70, 58)
    assert [stack.getSliceLabel(i + 1) for i in range(58)] == names
    np.testing.assert_array_equal(array_from_stack(stack), features)


def test_imagej_opens_the_tiff_hyperstack_with_channels_and_slice_labels(jvm, feature_files):
    from dinofeat_client.fiji.imagestack import array_from_stack
    from ij import IJ

    features, names = features_of(feature_files[0])
    opened = IJ.openImage(str(feature_files[1]))
    assert (opened.getNChannels(), opened.getNSlices(), opened.getWidth(), opened.getHeight()) == (58, 1, 90, 70)
    assert opened.getBitDepth() == 32
    stack = opened.getStack()
    assert [stack.getSliceLabel(i + 1) for i in range(58)] == names
    np.testing.assert_array_equal(array_from_stack(stack), features)


def test_a_feature_stack_of_a_volume_opens_as_channels_times_slices(jvm, server_address, tmp_path):
    from ij import IJ

    volume = (np.random.default_rng(6).random((3, 40, 50)) * 255).astype(np.uint8)
    with FeatureClient(server_address) as client:
        h5 = client.fetch_features(volume, tmp_path / "volume.h5", "classical").path
    with h5py.File(h5, "r") as f:
        write_imagej_hyperstack(f["features"], tmp_path / "volume.tif")
        expected = f["features"][:, 2]
    opened = IJ.openImage(str(tmp_path / "volume.tif"))
    assert (opened.getNChannels(), opened.getNSlices()) == (58, 3)
    opened.setPosition(5, 3, 1)
    np.testing.assert_array_equal(np.array(opened.getProcessor().getPixels(), np.float32).reshape(40, 50), expected[4])


def test_pushing_a_stack_into_java_keeps_every_value(jvm):
    from dinofeat_client.fiji.imagestack import array_from_stack, stack_from_array

    features = np.random.default_rng(7).normal(size=(4, 33, 47)).astype(np.float32)
    stack = stack_from_array(features, ["a", "b", "c", "d"])
    assert stack.getSliceLabel(3) == "c"
    np.testing.assert_array_equal(array_from_stack(stack), features)


def test_class_examples_become_rois_covering_exactly_their_pixels(jvm):
    from dinofeat_client.fiji.tws import class_roi, image_plus

    mask = np.zeros((30, 40), bool)
    mask[5:9, 10:20] = True
    mask[20, 3] = True
    covered = {(int(p.y), int(p.x)) for p in class_roi(mask).getContainedPoints()}
    assert covered == {(int(y), int(x)) for y, x in np.argwhere(mask)}
    volume = image_plus(np.arange(3 * 30 * 40, dtype=np.float32).reshape(3, 30, 40))
    assert (volume.getNSlices(), volume.getWidth(), volume.getHeight()) == (3, 40, 30)
    assert volume.getStack().getProcessor(3).getf(0) == 2 * 30 * 40


@pytest.mark.skipif(not os.path.exists(JYTHON_JAR), reason=f"{JYTHON_JAR} missing: `./dev test` installs Debian's jython")
@needs_imagej1
def test_the_fiji_script_library_reads_features_labels_and_calls_dinofeat_in_jython(feature_files, server_address, tmp_path, image):
    features, names = features_of(feature_files[0])
    labels = np.zeros((70, 90), np.uint8)
    labels[10, 5:25] = 1
    labels[40:43, 60:70] = 2
    tifffile.imwrite(tmp_path / "labels.tif", labels, imagej=True)
    tifffile.imwrite(tmp_path / "image.tif", image, imagej=True)
    command = shutil.which("dinofeat", path=str(Path(sys.executable).parent)) or "dinofeat"
    classpath = ":".join([JYTHON_JAR, *DEBIAN_JARS])
    result = subprocess.run(["java", "-cp", classpath, "org.python.util.jython", str(ROOT / "tests" / "jvm" / "fiji_library_check.py"),
                             str(ROOT / "fiji_macros" / "jars" / "Lib"), str(feature_files[0]), str(feature_files[1]),
                             str(tmp_path / "labels.tif"), command, server_address, str(tmp_path / "image.tif"),
                             str(tmp_path / "fetched.h5")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DINOFEAT_PROGRESS_SECONDS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    for kind in ("h5", "tiff", "fetched"):
        seen = report[kind]
        assert seen["labels"] == names and (seen["width"], seen["height"]) == (90, 70)
        np.testing.assert_allclose(seen["sums"], features.astype(np.float64).sum(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_array_equal(np.float32(seen["first_pixels"]), features[0].ravel()[:5])
    assert report["rois"] == {"1": [[1, 20]], "2": [[1, 30]]}
    assert report["class_order"] == ["2", "10", "cells"]  # label values by value, names after them
    stages = {stage for stage, _, _ in report["progress"]}
    assert "receiving" in stages and all(0 < done <= total for _, done, total in report["progress"]), report["progress"]
    assert report["fetch_error"].startswith("dinofeat: error: cannot read") and "missing" in report["fetch_error"]


def test_arff_export_holds_each_labelled_pixel_with_named_attributes_and_classes(server_address, tmp_path, image, feature_files):
    features, names = features_of(feature_files[0])
    labels = np.zeros((70, 90), np.uint16)
    labels[5, 10:40] = 85
    labels[60, 3:13] = 255
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    result = dinofeat("arff", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "x.arff"),
                      "--set", "classical", "--server", server_address)
    assert result.returncode == 0, result.stderr
    assert "40 labelled pixels, 2 classes" in result.stdout
    data, meta = arff.loadarff(tmp_path / "x.arff")
    assert meta.names() == [*names, "class"] and meta["class"] == ("nominal", ("85", "255"))
    assert len(data) == 40
    rows = np.array([[row[name] for name in names] for row in data])
    np.testing.assert_allclose(rows, features[:, labels != 0].T, rtol=1e-6)
    assert [row["class"].decode() for row in data] == [str(v) for v in labels[labels != 0]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.arff")]


def test_features_written_as_tiff_by_the_command_line_carry_channel_labels(server_address, tmp_path, image, feature_files):
    features, names = features_of(feature_files[0])
    tifffile.imwrite(tmp_path / "image.tif", image)
    result = dinofeat("features", str(tmp_path / "image.tif"), "-o", str(tmp_path / "f.tif"), "--set", "classical", "--server", server_address)
    assert result.returncode == 0, result.stderr
    with tifffile.TiffFile(tmp_path / "f.tif") as tiff:
        assert tiff.is_imagej and tiff.imagej_metadata["Labels"] == names and tiff.imagej_metadata["channels"] == 58
        np.testing.assert_array_equal(tiff.asarray(), features)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tif", "image.tif"]  # the temporary .h5 is gone


FIJI_DIR = os.environ.get("FIJI_DIR")
needs_fiji = pytest.mark.skipif(not FIJI_DIR, reason="FIJI_DIR is not set: these tests need a local Fiji.app with Trainable Weka "
                                "Segmentation (`./dev test` unpacks ../shared/vendor/fiji/Fiji.app.tar.gz when it is there)")
SEED = 1


def tws_miou_with_its_own_features(image: Path, scribbles: Path, truth: Path, folder: Path) -> float:
    """TWS's default features and forest (seeded) trained on the scribbles, in a JVM of its own."""
    own = subprocess.run([sys.executable, str(ROOT / "tests" / "jvm" / "tws_own_features.py"), FIJI_DIR, str(image), str(scribbles),
                          str(SEED), str(folder / "own.tif")], capture_output=True, text=True, timeout=900)
    assert own.returncode == 0, own.stderr[-3000:]
    return mean_iou(tifffile.imread(folder / "own.tif"), tifffile.imread(truth))


@needs_fiji
def test_tws_on_our_features_reaches_tws_on_its_own_in_a_real_fiji(isb_three_phase, server_address, tmp_path):
    image, scribbles, truth = (isb_three_phase / n for n in ("image.tif", "scribbles.tif", "ground_truth.tif"))
    model = tmp_path / "tws.model"
    trained = dinofeat("fiji", "train", str(image), "--labels", str(scribbles), "-o", str(model), "--set", "classical",
                       "--seed", str(SEED), "--server", server_address, timeout=1800)
    assert trained.returncode == 0, trained.stderr
    assert "classes 85, 170, 255" in trained.stdout
    assert json.loads((tmp_path / "tws.model.dinofeat.json").read_text())["computation"]["feature_set"] == "classical"
    applied = dinofeat("fiji", "apply", str(model), str(image), "-o", str(tmp_path / "classes.tif"),  # the set: from the sidecar
                       "--server", server_address, "--probabilities", str(tmp_path / "p.tif"), timeout=1800)
    assert applied.returncode == 0, applied.stderr
    classes = tifffile.imread(tmp_path / "classes.tif")
    assert set(np.unique(classes)) == {85, 170, 255}
    ours = mean_iou(classes, tifffile.imread(truth))
    own = tws_miou_with_its_own_features(image, scribbles, truth, tmp_path)
    print(f"mIoU inside TWS: our classical features {ours:.3f}, TWS's own features {own:.3f}")
    assert ours >= own - 0.01


def test_tws_class_names_that_are_not_numbers_become_1_to_k():
    from dinofeat_client.fiji.tws import class_values

    assert class_values(["85", "170", "255"]) == [85, 170, 255]
    assert class_values(["class 1", "class 2", "class 10"]) == [1, 2, 3]
    assert class_values(["cells", "background"]) == [1, 2]


@pytest.mark.parametrize("layout, message", [
    ({}, "is not a Fiji installation (it has no jars/ folder)"),
    ({"jars/ij-1.54g.jar": ""}, "has no Trainable Weka Segmentation (no plugins/Trainable_Segmentation*.jar)"),
])
def test_a_folder_that_is_not_a_fiji_with_tws_is_named_in_one_sentence(tmp_path, server_address, layout, message):
    fiji = tmp_path / "Fiji.app"
    fiji.mkdir()
    for name, text in layout.items():
        (fiji / name).parent.mkdir(parents=True, exist_ok=True)
        (fiji / name).write_text(text)
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((32, 32), np.uint8))
    result = dinofeat("fiji", "apply", str(tmp_path / "image.tif"), str(tmp_path / "image.tif"), "-o", str(tmp_path / "c.tif"),
                      "--fiji", str(fiji), "--set", "classical", "--server", server_address)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_without_jpype_the_fiji_bridge_says_how_to_install_it_from_a_release_and_a_checkout(tmp_path, monkeypatch):
    from dinofeat.contract.errors import DinofeatError
    from dinofeat_client.fiji.jvm import start_fiji

    (tmp_path / "Fiji.app" / "jars").mkdir(parents=True)
    (tmp_path / "Fiji.app" / "plugins").mkdir()
    (tmp_path / "Fiji.app" / "plugins" / "Trainable_Segmentation-4.0.0.jar").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "jpype", None)  # as when the fiji extra is not installed
    with pytest.raises(DinofeatError) as refused:
        start_fiji(tmp_path / "Fiji.app")
    assert "pip install 'dinofeat[fiji]' for a released dinofeat" in str(refused.value)
    assert "pip install -e '.[fiji]' in a dinofeat checkout" in str(refused.value)
