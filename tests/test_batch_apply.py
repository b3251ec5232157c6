"""Many images in one command: `apply MODEL IMAGE... -o OUTDIR` (files, folders, globs) with one model,
going on after a failed image, skipping outputs that exist unless --overwrite; `fewshot` likewise."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import run_cli


def phases(seed: int) -> np.ndarray:
    """A 64x64 two-phase image: dark left, bright right, noise."""
    rng = np.random.default_rng(seed)
    image = np.full((64, 64), 60.0)
    image[:, 32:] = 190
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory, inprocess_address):
    folder = tmp_path_factory.mktemp("model")
    tifffile.imwrite(folder / "train.tif", phases(0))
    labels = np.zeros((64, 64), np.uint8)
    labels[10:50, 5:12], labels[10:50, 50:57] = 1, 2
    tifffile.imwrite(folder / "labels.tif", labels)
    trained = run_cli("train", str(folder / "train.tif"), "--labels", str(folder / "labels.tif"), "-o", str(folder / "m.dfm"),
                       "--set", "classical", "--trees", "10", "--server", inprocess_address)
    assert trained.returncode == 0, trained.stderr
    return folder / "m.dfm"


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for n in range(3):
        tifffile.imwrite(folder / f"cell{n}.tif", phases(n + 1))
    return folder


def test_a_folder_of_images_gives_one_class_map_each_in_the_output_folder(model, images, tmp_path, inprocess_address):
    result = run_cli("apply", str(model), str(images), "-o", str(tmp_path / "out"), "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cell0.tif", "cell1.tif", "cell2.tif"]
    class_map = tifffile.imread(tmp_path / "out" / "cell1.tif")
    assert (class_map[:, :28] == 1).mean() > 0.95 and (class_map[:, 36:] == 2).mean() > 0.95
    assert "3 done." in result.stdout


def test_a_failing_image_is_reported_and_the_others_are_done(model, images, tmp_path, inprocess_address):
    (images / "broken.tif").write_bytes(b"not a tiff at all")
    result = run_cli("apply", str(model), str(images), "-o", str(tmp_path / "out"), "--server", inprocess_address)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "broken.tif: cannot read" in result.stderr
    assert "1 of 4 images failed" in result.stderr.splitlines()[-1]
    assert "3 done, 1 failed: broken.tif: cannot read" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cell0.tif", "cell1.tif", "cell2.tif"]


def test_existing_outputs_are_skipped_unless_overwrite(model, images, tmp_path, inprocess_address):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cell0.tif").write_bytes(b"an earlier result")
    result = run_cli("apply", str(model), str(images / "*.tif"), "-o", str(out), "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert "2 done, 1 skipped" in result.stdout
    assert (out / "cell0.tif").read_bytes() == b"an earlier result"
    again = run_cli("apply", str(model), str(images / "*.tif"), "-o", str(out), "--overwrite", "--server", inprocess_address)
    assert again.returncode == 0, again.stderr
    assert "3 done." in again.stdout
    assert tifffile.imread(out / "cell0.tif").shape == (64, 64)


def test_probabilities_of_many_images_go_beside_each_class_map(model, images, tmp_path, inprocess_address):
    result = run_cli("apply", str(model), str(images / "cell0.tif"), str(images / "cell2.tif"), "-o", str(tmp_path / "out"),
                      "--probabilities", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cell0.probabilities.h5", "cell0.tif", "cell2.probabilities.h5", "cell2.tif"]


def test_one_probabilities_file_for_many_images_is_refused(model, images, tmp_path, inprocess_address):
    result = run_cli("apply", str(model), str(images), "-o", str(tmp_path / "out"), "--probabilities", str(tmp_path / "p.h5"),
                      "--server", inprocess_address)
    assert result.returncode == 1
    assert result.stderr.strip() == ("dinofeat: error: with an output folder --probabilities takes no file name: "
                                     "each image's probabilities go to OUTDIR/NAME.probabilities.h5.")


def test_inputs_whose_outputs_would_collide_are_refused(model, images, tmp_path, inprocess_address):
    tifffile.imwrite(tmp_path / "cell0.tif", phases(9))
    result = run_cli("apply", str(model), str(images), str(tmp_path / "cell0.tif"), "-o", str(tmp_path / "out"),
                      "--server", inprocess_address)
    assert result.returncode == 1
    assert "several inputs are named 'cell0'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_nothing_is_one_sentence(model, tmp_path, inprocess_address):
    result = run_cli("apply", str(model), str(tmp_path / "*.tif"), "-o", str(tmp_path / "out"), "--server", inprocess_address)
    assert result.returncode == 1
    assert result.stderr.strip() == f"dinofeat: error: no image file matches {str(tmp_path / '*.tif')!r}."


def test_fewshot_creates_its_output_folder_and_takes_a_folder_of_queries(images, tmp_path, inprocess_address):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 36:] = 255
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    result = run_cli("fewshot", str(images), "--support", str(images / "cell0.tif"), "--support-mask", str(tmp_path / "mask.tif"),
                      "-o", str(tmp_path / "masks"), "--set", "classical", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["cell0_mask.tif", "cell1_mask.tif", "cell2_mask.tif"]
