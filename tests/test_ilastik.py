"""ilastik projects and feature files, checked structurally against real ilastik projects (ilastik
itself cannot be installed here; shared/docs/ILASTIK.md lists what it reads)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import SHARED_DATA, run_cli

REFERENCE = SHARED_DATA / "ilastik_reference" / "pc.ilp"


@pytest.fixture(scope="module")
def crops(isb_three_phase, tmp_path_factory) -> list[tuple[Path, Path]]:
    """Three 96x110 crops of the ISB image with their scribbles (crops that hold all three classes)."""
    folder = tmp_path_factory.mktemp("crops")
    image = tifffile.imread(isb_three_phase / "image.tif")
    scribbles = tifffile.imread(isb_three_phase / "scribbles.tif")
    out = []
    for number, (y, x) in enumerate([(0, 0), (200, 150), (400, 380)]):
        crop, labels = image[y : y + 96, x : x + 110], scribbles[y : y + 96, x : x + 110].copy()
        labels[:3, :3], labels[-3:, :3], labels[:3, -3:] = 85, 170, 255  # every crop labels every class
        tifffile.imwrite(folder / f"img{number}.tif", crop)
        tifffile.imwrite(folder / f"img{number}_scribbles.tif", labels)
        out.append((folder / f"img{number}.tif", folder / f"img{number}_scribbles.tif"))
    return out


def make_project(crops, folder: Path, server: str, count: int, scribbles: bool) -> subprocess.CompletedProcess:
    args = ["ilastik", *[str(c[0]) for c in crops[:count]], "-o", str(folder), "--set", "hybrid", "--pca", "8",
            "--preset", "fast", "--server", server]
    if scribbles:
        args += ["--labels", *[str(c[1]) for c in crops[:count]], "--classes", "matrix", "grain", "pit"]
    return run_cli(*args)


def kind(dataset: h5py.Dataset) -> str:
    """dtype kind with every string flavour (fixed, variable, object) as one."""
    return "string" if dataset.dtype.kind in "SOU" else dataset.dtype.kind


@pytest.mark.parametrize("count,scribbles", [(1, False), (1, True), (3, True)])
def test_project_has_every_group_dataset_and_attribute_ilastik_reads(crops, inprocess_deep_address, tmp_path, count, scribbles):
    result = make_project(crops, tmp_path / "proj", inprocess_deep_address, count, scribbles)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "proj" / "dinofeat.ilp", "r") as ours, h5py.File(REFERENCE, "r") as reference:
        for name in ["ilastikVersion", "workflowName", "time", "Input Data/StorageVersion", "Input Data/Role Names",
                     "FeatureSelections/StorageVersion", "FeatureSelections/FeatureIds", "FeatureSelections/Scales",
                     "FeatureSelections/SelectionMatrix", "FeatureSelections/ComputeIn2d", "PixelClassification/StorageVersion",
                     "PixelClassification/LabelNames", "PixelClassification/LabelColors", "PixelClassification/PmapColors"]:
            assert kind(ours[name]) == kind(reference[name]), name
            if name not in ("PixelClassification/LabelNames", "PixelClassification/LabelColors", "PixelClassification/PmapColors"):
                assert ours[name].shape == reference[name].shape, name  # the class-dependent ones differ in length
        assert ours["workflowName"][()] == b"Pixel Classification"
        assert ours["currentApplet"][()] == 2 and ours["currentApplet"].dtype == np.int64
        assert [v.decode() for v in ours["Input Data/Role Names"][()]] == ["Raw Data", "Prediction Mask"]
        assert list(ours["FeatureSelections/FeatureIds"][()]) == list(reference["FeatureSelections/FeatureIds"][()])
        np.testing.assert_array_equal(ours["FeatureSelections/Scales"][()], reference["FeatureSelections/Scales"][()])
        matrix = ours["FeatureSelections/SelectionMatrix"][()]
        assert matrix.shape == (6, 7) and matrix[0, 0] and matrix.sum() == 1
        assert "FeatureListFilename" not in ours["FeatureSelections"]
        assert "local_data" in ours["Input Data"]
        for name in ("LabelNames", "LabelColors", "PmapColors"):
            assert ours["PixelClassification"][name].attrs["isEmpty"] == False  # noqa: E712
        assert ours["PixelClassification/LabelColors"].shape == (3 if scribbles else 2, 3)
        reference_raw = set(reference["Input Data/infos/lane0000/Raw Data"]) | {"normalizeDisplay"}
        for lane in range(count):
            raw = ours[f"Input Data/infos/lane{lane:04d}/Raw Data"]
            assert "Prediction Mask" in ours[f"Input Data/infos/lane{lane:04d}"]
            for field in ("filePath", "allowLabels", "nickname", "axistags", "shape", "location", "datasetId", "__class__",
                          "display_mode", "normalizeDisplay"):
                assert field in raw and field in reference_raw | {"filePath"}, field
            assert raw["__class__"][()] == b"RelativeFilesystemDatasetInfo" and raw["location"][()] == b"FileSystem"
            file_name, internal = raw["filePath"][()].decode().split(".h5/")
            target = tmp_path / "proj" / (file_name + ".h5")
            assert target.exists() and not internal.startswith("/")
            with h5py.File(target, "r") as features:
                data = features[internal]
                tags = json.loads(raw["axistags"][()])
                assert len(tags["axes"]) == data.ndim == len(raw["shape"][()])
                assert [a["key"] for a in tags["axes"]] == ["c", "y", "x"] and tuple(raw["shape"][()]) == data.shape
                assert json.loads(data.attrs["axistags"]) == tags
                assert data.shape[0] == 8 + 58 and data.chunks == (66, 64, 64) and data.dtype == np.float32


def test_scribbles_become_label_blocks_with_values_1_to_n(crops, inprocess_deep_address, tmp_path):
    assert make_project(crops, tmp_path / "proj", inprocess_deep_address, 3, True).returncode == 0
    with h5py.File(tmp_path / "proj" / "dinofeat.ilp", "r") as f:
        assert [v.decode() for v in f["PixelClassification/LabelNames"][()]] == ["matrix", "grain", "pit"]
        for lane, (_, scribble_path) in enumerate(crops):
            block = f[f"PixelClassification/LabelSets/labels{lane:03d}/block0000"]
            y0, y1, x0, x1 = map(int, re.match(r"\[(\d+):(\d+),(\d+):(\d+),0:1\]$", block.attrs["blockSlice"]).groups())
            scribbles = tifffile.imread(scribble_path)
            expected = np.searchsorted([85, 170, 255], scribbles) + 1
            expected[scribbles == 0] = 0
            assert block.dtype == np.uint8 and block.shape == (y1 - y0, x1 - x0, 1)
            np.testing.assert_array_equal(block[..., 0], expected[y0:y1, x0:x1])
            assert set(np.unique(block[()])) == {0, 1, 2, 3}
            assert not expected[:y0].any() and not expected[y1:].any()


def test_batch_reuses_the_projects_feature_space(crops, inprocess_deep_address, tmp_path):
    folder = tmp_path / "proj"
    assert make_project(crops, folder, inprocess_deep_address, 2, True).returncode == 0
    space = json.loads((folder / "dinofeat_space.json").read_text())
    assert space["identity"]["feature_set"]["pca"] == 8 and space["components"]["shape"][0] == 8
    with h5py.File(folder / "img0" / "features.h5", "r") as f, h5py.File(folder / "img1" / "features.h5", "r") as g:
        original = f["features"][()]
        assert json.loads(f["feature_space"]["json"][()]) == space == json.loads(g["feature_space"]["json"][()])
    tifffile.imwrite(tmp_path / "again.tif", tifffile.imread(crops[0][0]))
    first = run_cli("ilastik", "--batch", str(folder), str(tmp_path / "again.tif"), "--server", inprocess_deep_address)  # as the README says
    assert first.returncode == 0, first.stderr
    assert "--headless" in first.stdout and f"{folder / 'again' / 'features.h5'}/features" in first.stdout
    with h5py.File(folder / "again" / "features.h5", "r") as f:
        once = f["features"][()]
    assert run_cli("ilastik", "--batch", str(folder), str(tmp_path / "again.tif"), "--server", inprocess_deep_address).returncode == 0
    with h5py.File(folder / "again" / "features.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][()], once)
    np.testing.assert_allclose(once, original, atol=1e-5)


def test_the_project_folder_is_named_once_either_new_or_existing(crops, tmp_path):
    for extra in ([], ["-o", str(tmp_path / "p"), "--batch", str(tmp_path / "q")]):
        result = run_cli("ilastik", str(crops[0][0]), *extra)
        assert result.returncode == 1
        assert result.stderr.strip() == ("dinofeat: error: give -o FOLDER for a new project, or --batch PROJECT for new "
                                         "images of an existing one.")


def test_the_closing_hint_for_new_images_is_a_command_that_works(crops, inprocess_address, tmp_path):
    made = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--set", "classical", "--server", inprocess_address)
    assert made.returncode == 0, made.stderr
    hint = made.stdout.strip().splitlines()[-1]
    assert hint.endswith(f"dinofeat ilastik --batch {tmp_path / 'p'} IMAGE...")
    again = run_cli("ilastik", "--batch", str(tmp_path / "p"), str(crops[1][0]), "--server", inprocess_address)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "p" / "img1" / "features.h5").exists()


def test_a_project_reports_its_progress_image_by_image(crops, inprocess_address, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFEAT_PROGRESS_SECONDS", "0")
    result = run_cli("ilastik", str(crops[0][0]), str(crops[1][0]), "-o", str(tmp_path / "p"), "--set", "classical",
                      "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^dinofeat: images 1/2 \(50 %\)", result.stderr, re.MULTILINE), result.stderr
    assert re.search(r"^dinofeat: images 2/2 \(100 %\)", result.stderr, re.MULTILINE), result.stderr


def test_uint8_quantisation_uses_the_projects_scaling(crops, inprocess_deep_address, tmp_path):
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "q"), "--set", "classical", "--quantise", "uint8",
                      "--server", inprocess_deep_address)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "q" / "img0" / "features.h5", "r") as f:
        data = f["features"]
        assert data.dtype == np.uint8 and data.shape == (58, 96, 110)
        assert data[()].min(axis=(1, 2)).max() == 0 and (data[()].max(axis=(1, 2)) == 255).sum() >= 57


def test_vigra_reads_our_axistags(tmp_path):
    probe = subprocess.run(["/usr/bin/python3", "-c", "import vigra"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-vigra is not installed for the system Python here")
    from dinofeat.contract.wire import axistags

    out = subprocess.run(["/usr/bin/python3", "-c", "import sys, vigra; t = vigra.AxisTags.fromJSON(sys.argv[1]); "
                          "print(''.join(a.key for a in t))", axistags("cyx")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cyx"


def test_a_failed_project_leaves_no_empty_folder(crops, inprocess_address, tmp_path):
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "proj"), "--set", "nope", "--server", inprocess_address)
    assert result.returncode == 1 and "unknown feature set 'nope'" in result.stderr
    assert not (tmp_path / "proj").exists()


def test_ilastik_help_names_the_pca_default_the_project_uses():
    from dinofeat_client.ilastik.provider import IlastikSpec

    result = run_cli("ilastik", "--help")
    assert f"PCA components of the deep features (default {IlastikSpec().computation.pca})" in " ".join(result.stdout.split())
    assert IlastikSpec().computation.pca == 48


MADE_BY = "give a project made by `dinofeat ilastik IMAGES -o FOLDER`."


def not_hdf5(path: Path) -> None:
    path.write_bytes(b"an ilastik project, honestly\n")


def truncated(path: Path) -> None:
    from dinofeat_client.ilastik.project import write_project

    write_project(path, [], ["a", "b"])
    path.write_bytes(path.read_bytes()[:1500])  # the HDF5 signature, then nothing: a download cut short


def object_classification(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["workflowName"] = b"Object Classification"


def pixel_classification_not_ours(path: Path) -> None:
    from dinofeat_client.ilastik.project import Lane, write_project
    from dinofeat.contract.wire import axistags

    write_project(path, [Lane("raw/features.h5", "features", (1, 8, 8), axistags("cyx"), "raw")], ["a", "b"])


@pytest.mark.parametrize("make,sentence", [
    (not_hdf5, "{p} is not an ilastik project: it cannot be read as HDF5 (damaged or only partly copied?); " + MADE_BY),
    (truncated, "{p} is not an ilastik project: it cannot be read as HDF5 (damaged or only partly copied?); " + MADE_BY),
    (object_classification, "{p} is an ilastik Object Classification project; dinofeat's features go into Pixel "
                            "Classification projects: " + MADE_BY),
    (pixel_classification_not_ours, "{p} was not made by `dinofeat ilastik` (no dinofeat_ilastik.json or dinofeat_space.json "
                                    "beside it), so its feature space is unknown; create a project with `dinofeat ilastik "
                                    "IMAGES -o FOLDER`."),
], ids=["not_hdf5", "truncated", "object_classification", "pixel_classification_not_ours"])
def test_a_batch_into_a_foreign_or_broken_ilp_is_refused_in_one_sentence_and_writes_nothing(crops, tmp_path, make, sentence):
    project = tmp_path / "theirs" / "project.ilp"
    project.parent.mkdir()
    make(project)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for target in (project, project.parent):  # the .ilp, or its folder
        result = run_cli("ilastik", "--batch", str(target), str(crops[0][0]))
        assert result.returncode == 1
        assert result.stderr.strip() == "dinofeat: error: " + sentence.format(p=project)
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_batch_into_a_folder_with_two_projects_asks_which_one(crops, inprocess_address, tmp_path):
    assert run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--set", "classical",
                    "--server", inprocess_address).returncode == 0
    (tmp_path / "p" / "copy.ilp").write_bytes((tmp_path / "p" / "dinofeat.ilp").read_bytes())
    result = run_cli("ilastik", "--batch", str(tmp_path / "p"), str(crops[1][0]), "--server", inprocess_address)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dinofeat: error: {tmp_path / 'p'} holds 2 ilastik projects (copy.ilp, dinofeat.ilp); "
                                     f"name one: --batch {tmp_path / 'p' / 'copy.ilp'}.")
    named = run_cli("ilastik", "--batch", str(tmp_path / "p" / "dinofeat.ilp"), str(crops[1][0]), "--server", inprocess_address)
    assert named.returncode == 0, named.stderr
    assert f"--project={tmp_path / 'p' / 'dinofeat.ilp'} " in named.stdout


def test_the_printed_headless_command_keeps_paths_with_spaces_whole_and_names_results_after_the_image(tmp_path):
    from dinofeat_client.ilastik.headless import headless_command

    folder = tmp_path / "my project"
    command = shlex.split(headless_command(folder / "dinofeat.ilp", [folder / "new 01" / "features.h5"]))
    assert command[:3] == ["./run_ilastik.sh", "--headless", f"--project={folder / 'dinofeat.ilp'}"]
    assert "--output_filename_format={dataset_dir}_{result_type}.h5" in command  # {dataset_dir} is .../new 01
    assert command[-2:] == ["--raw_data", f"{folder / 'new 01' / 'features.h5'}/features"]


def test_a_labelled_project_without_ilastik_says_ilastik_trains_on_its_first_run_and_how_to_store_it(crops, inprocess_address, tmp_path):
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--labels", str(crops[0][1]), "--set", "classical",
                      "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-2]
    assert line.startswith("ilastik will train the classifier from the labels on its first run")
    assert f"./run_ilastik.sh --headless --project={tmp_path / 'p' / 'dinofeat.ilp'} --retrain --readonly=false" in line
    with h5py.File(tmp_path / "p" / "dinofeat.ilp", "r") as f:
        assert "PixelClassification/ClassifierForests" not in f


def test_a_missing_ilastik_launcher_is_refused_before_any_feature_is_computed(crops, tmp_path):
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--labels", str(crops[0][1]),
                      "--ilastik", str(tmp_path / "nowhere" / "run_ilastik.sh"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dinofeat: error: --ilastik names {tmp_path / 'nowhere' / 'run_ilastik.sh'}, which is not "
                                     "an executable file; give the path of run_ilastik.sh in the folder ilastik was unpacked to.")
    assert not (tmp_path / "p").exists()


def test_ilastik_without_labels_has_nothing_to_train(crops, tmp_path):
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--ilastik", "run_ilastik.sh")
    assert result.returncode == 1
    assert result.stderr.strip() == ("dinofeat: error: --ilastik trains the project's classifier from the scribbles; give them "
                                     "with --labels too.")
    assert not (tmp_path / "p").exists()


def test_a_failed_ilastik_training_says_why_and_leaves_the_project_without_a_classifier(crops, inprocess_address, tmp_path):
    fake = tmp_path / "run_ilastik.sh"
    fake.write_text("#!/bin/sh\necho 'Opening Project'\necho 'ERROR: the forest caught fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    result = run_cli("ilastik", str(crops[0][0]), "-o", str(tmp_path / "p"), "--labels", str(crops[0][1]), "--set", "classical",
                      "--ilastik", str(fake), "--server", inprocess_address)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"dinofeat: error: ilastik could not train the classifier of {tmp_path / 'p' / 'dinofeat.ilp'} (exit code 3: ERROR: "
        "the forest caught fire); the project is unchanged and ilastik will train from its labels on its first run.")
    with h5py.File(tmp_path / "p" / "dinofeat.ilp", "r") as f:
        assert "PixelClassification/ClassifierForests" not in f and "PixelClassification/LabelSets/labels000/block0000" in f
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["dinofeat.ilp", "dinofeat_ilastik.json", "dinofeat_space.json", "img0"]
