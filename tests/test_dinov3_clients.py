"""Every client offers the DINOv3 backbones (issue 28 item 5): the listing of `dinofeat sets` and the help, the
shipped Fiji script inside real Trainable Weka Segmentation, the ilastik provider, volumes, few-shot and model files,
each through its command with a random-weight ViT-S/16 of the real architecture (`dinofeat weights random`), and
a CPU server's refusal of the 7B before any weights load."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import run_cli
from dinofeat_client.cli.servers import DINOV2_BACKBONES, DINOV3_BACKBONES
from dinofeat_server.engine.weights import BACKBONES
from test_fiji_script_real import run_script, why_no_fiji_script_run

BACKBONE = "dinov3_vits16"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A seeded random ViT-S/16 checkpoint in the official layout, as users make one offline."""
    path = tmp_path_factory.mktemp("dinov3") / "random_vits16.pth"
    made = run_cli("weights", "random", BACKBONE, "-o", str(path))
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two 8-bit 96 x 112 images (not multiples of 16), scribbles of two classes and a support mask, as TIFFs."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:112]
    for name, shift in (("cells", 0), ("more", 9)):
        blobs = 120 + 80 * np.sin((x + shift) / 7) * np.cos(y / 9) + rng.normal(0, 10, (96, 112))
        tifffile.imwrite(folder / f"{name}.tif", np.clip(blobs, 0, 255).astype(np.uint8))
    scribbles = np.zeros((96, 112), np.uint8)
    scribbles[10:20, 10:40], scribbles[60:70, 50:90] = 1, 2
    tifffile.imwrite(folder / "scribbles.tif", scribbles)
    tifffile.imwrite(folder / "mask.tif", (np.sin(x / 7) * np.cos(y / 9) > 0).astype(np.uint8))
    return folder


def deep(weights: Path, *more: str) -> tuple[str, ...]:
    """The options of a DINOv3 computation on this machine: backbone, weights file, the CPU preset, no progress bars."""
    return ("--backbone", BACKBONE, "--weights", str(weights), "--preset", "fast", "--no-local-server", "--quiet", *more)


def stored_backbone(path: Path) -> tuple[str, str]:
    """(backbone of the stored computation, backbone of the feature space's identity) of an HDF5 feature file."""
    with h5py.File(path, "r") as f:
        computation = json.loads(f["features"].attrs["computation"])
        space = json.loads(f["feature_space"]["json"][()])
    return computation["backbone"], space["identity"]["feature_set"]["backbone"]


def test_sets_lists_the_dinov3_backbones_after_the_sets_without_a_server():
    listed = run_cli("sets")
    assert listed.returncode == 0, listed.stderr
    backbones = listed.stdout.split("\n\n")[1]
    assert backbones.startswith("backbones of the deep sets (--backbone")
    assert all(name in backbones for name in DINOV3_BACKBONES + DINOV2_BACKBONES)
    assert "dinov3_vit7b16 (GPU servers only)" in backbones and "DINOv3 License" in backbones


def test_the_listed_backbones_are_the_ones_the_server_loads():
    assert DINOV2_BACKBONES + DINOV3_BACKBONES == BACKBONES


def test_the_deep_commands_help_names_the_dinov3_backbones():
    for command in (("features",), ("fewshot",), ("ilastik",), ("fiji", "train")):
        shown = run_cli(*command, "--help")
        assert "dinov3_vit{s16,s16plus,b16,l16" in " ".join(shown.stdout.split()), command


@pytest.mark.skipif(why_no_fiji_script_run() is not None, reason=str(why_no_fiji_script_run()))
def test_the_fiji_script_trains_tws_on_dinov3_features_computed_here_from_the_weights_file(images, weights, tmp_path):
    dinofeat = shutil.which("dinofeat", path=str(Path(sys.executable).parent)) or "dinofeat"
    report, result = run_script(tmp_path / "fiji", {
        "image": str(images / "cells.tif"), "dinofeat": dinofeat, "server": "", "feature_set": "attention", "preset": "fast",
        "backbone": BACKBONE, "weights": str(weights), "feature_file": None, "examples": "Label image",
        "label_image": str(images / "scribbles.tif"), "load_classifier": None, "save_classifier": None, "probabilities": False})
    [fetched] = (tmp_path / "fiji" / "tmp").glob("dinofeat_features_*.h5")
    assert stored_backbone(fetched) == (BACKBONE, BACKBONE)
    [segmentation] = report["segmentations"]
    assert segmentation["features"] == 6 and segmentation["class_labels"] == ["1", "2"]  # ViT-S/16's heads, in TWS
    assert set(np.unique(tifffile.imread(result))) <= {0, 1}


@pytest.fixture(scope="module")
def project(images, weights, tmp_path_factory) -> Path:
    """An ilastik project on DINOv3 hybrid features of one image with its scribbles, made by `dinofeat ilastik`."""
    folder = tmp_path_factory.mktemp("ilastik") / "project"
    made = run_cli("ilastik", str(images / "cells.tif"), "-o", str(folder), "--labels", str(images / "scribbles.tif"),
                   *deep(weights))
    assert made.returncode == 0, made.stderr
    return folder


def test_an_ilastik_project_on_dinov3_stores_the_backbone_in_its_spec_and_feature_space(project):
    spec = json.loads((project / "dinofeat_ilastik.json").read_text())
    space = json.loads((project / "dinofeat_space.json").read_text())
    assert spec["computation"]["backbone"] == BACKBONE == space["identity"]["feature_set"]["backbone"]
    with h5py.File(project / "cells" / "features.h5", "r") as f:
        assert f["features"].shape == (48 + 58, 96, 112)  # hybrid: 48 DINOv3 components and the classical bank


def test_ilastik_batch_computes_new_images_with_the_projects_dinov3_backbone_given_only_the_weights(project, images, weights):
    added = run_cli("ilastik", "--batch", str(project), str(images / "more.tif"), "--weights", str(weights),
                    "--no-local-server", "--quiet")
    assert added.returncode == 0, added.stderr
    with h5py.File(project / "more" / "features.h5", "r") as new, h5py.File(project / "cells" / "features.h5", "r") as old:
        assert new["feature_space"]["json"][()] == old["feature_space"]["json"][()]  # the project's DINOv3 space


def test_features_like_a_dinov3_file_takes_its_backbone_given_only_the_weights(images, weights, tmp_path):
    first = tmp_path / "cells.h5"
    assert run_cli("features", str(images / "cells.tif"), "-o", str(first), "--set", "dinov2", *deep(weights)).returncode == 0
    done = run_cli("features", str(images / "more.tif"), "-o", str(tmp_path / "more.h5"), "--like", str(first),
                   "--weights", str(weights), "--no-local-server", "--quiet")
    assert done.returncode == 0, done.stderr
    assert stored_backbone(tmp_path / "more.h5") == (BACKBONE, BACKBONE)


def test_a_volume_of_dinov3_features_records_the_backbone_in_its_zarr_attributes(images, weights, tmp_path):
    stack = np.stack([tifffile.imread(images / "cells.tif"), tifffile.imread(images / "more.tif")])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    done = run_cli("features", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "stack.zarr"), "--set", "dinov2", *deep(weights))
    assert done.returncode == 0, done.stderr
    attributes = json.loads((tmp_path / "stack.zarr" / ".zattrs").read_text())["dinofeat"]
    assert attributes["computation"]["backbone"] == BACKBONE and attributes["complete"]
    assert attributes["feature_space"]["identity"]["feature_set"]["stride"] == 16  # fast: one view at the patch's stride


def test_fewshot_segments_queries_with_a_dinov3_backbone(images, weights, tmp_path):
    done = run_cli("fewshot", str(images / "more.tif"), "--support", str(images / "cells.tif"), "--support-mask",
                   str(images / "mask.tif"), "-o", str(tmp_path / "masks"), *deep(weights))
    assert done.returncode == 0, done.stderr
    mask = tifffile.imread(tmp_path / "masks" / "more_mask.tif")
    assert mask.shape == (96, 112) and 0 < np.count_nonzero(mask) < mask.size


def test_a_model_trained_on_dinov3_features_applies_to_a_new_image_given_only_the_weights(images, weights, tmp_path):
    trained = run_cli("train", str(images / "cells.tif"), "--labels", str(images / "scribbles.tif"), "-o",
                      str(tmp_path / "cells.dfm"), "--set", "hybrid", *deep(weights))
    assert trained.returncode == 0, trained.stderr
    applied = run_cli("apply", str(tmp_path / "cells.dfm"), str(images / "more.tif"), "-o", str(tmp_path / "more.tif"),
                      "--weights", str(weights), "--no-local-server", "--quiet")
    assert applied.returncode == 0, applied.stderr
    assert set(np.unique(tifffile.imread(tmp_path / "more.tif"))) <= {1, 2}


def test_a_cpu_server_refuses_the_7b_in_one_sentence_before_reading_its_weights(images, tmp_path):
    not_weights = tmp_path / "dinov3_vit7b16.pth"
    not_weights.write_bytes(b"never read: the refusal comes first")
    refused = run_cli("features", str(images / "cells.tif"), "-o", str(tmp_path / "f.h5"), "--set", "dinov2", "--backbone",
                      "dinov3_vit7b16", "--weights", str(not_weights), "--device", "cpu", "--no-local-server", "--quiet")
    assert refused.returncode == 1 and not (tmp_path / "f.h5").exists()
    assert refused.stderr == ("dinofeat: error: dinov3_vit7b16 runs on GPU servers only (27 GB of weights, hours per image on "
                              "a CPU), and this server computes on a CPU; start it with --device cuda, or choose dinov3_vitl16 "
                              "or a smaller backbone.\n")
