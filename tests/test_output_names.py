"""Outputs are what their names say, status asks for a server, and scores of clusterings are matched."""

from __future__ import annotations

import numpy as np
import tifffile
from conftest import run_cli
from dinofeat_client.metrics import assignment, class_iou, matched_to_truth
from scipy.optimize import linear_sum_assignment


def test_features_refuse_an_output_named_for_another_format(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    result = run_cli("features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "a.npy"))
    assert result.returncode == 1
    assert result.stderr.strip() == "dinofeat: error: dinofeat features writes .h5 or .tif files, not '.npy'; name the output a.h5."
    assert not (tmp_path / "a.npy").exists()


def test_a_format_flag_that_contradicts_the_suffix_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    result = run_cli("features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "a.h5"), "--format", "tiff")
    assert result.returncode == 1 and "--format tiff does not match the output name" in result.stderr


def test_pca_writes_png_or_tiff_as_named_and_refuses_other_names(inprocess_address, tmp_path):
    image = (np.random.default_rng(0).random((64, 70)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([image, image[::-1]]))
    common = ["--server", inprocess_address]
    assert run_cli("pca", str(tmp_path / "img.tif"), "-o", str(tmp_path / "p.tif"), *common).returncode == 0
    assert tifffile.imread(tmp_path / "p.tif").shape == (64, 70, 3)
    assert run_cli("pca", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "s.tif"), *common).returncode == 0
    assert tifffile.imread(tmp_path / "s.tif").shape == (2, 64, 70, 3)
    refused = run_cli("pca", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "s.png"), *common)
    assert refused.returncode == 1 and "PNG cannot hold; name the output s.tif" in refused.stderr
    jpeg = run_cli("pca", str(tmp_path / "img.tif"), "-o", str(tmp_path / "p.jpg"), *common)
    assert jpeg.returncode == 1 and "dinofeat pca writes .png or .tif files, not '.jpg'" in jpeg.stderr
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "p.jpg").exists()


def test_status_without_a_server_asks_for_one():
    result = run_cli("status")
    assert result.returncode == 1
    assert result.stderr.strip() == "dinofeat: error: dinofeat status reports on a running server; pass --server HOST:PORT."


def test_the_assignment_is_as_cheap_as_scipys():
    rng = np.random.default_rng(1)
    for rows, columns in [(3, 3), (5, 9), (12, 12)]:
        cost = rng.random((rows, columns))
        best_rows, best_columns = linear_sum_assignment(cost)
        assert cost[np.arange(rows), assignment(cost)].sum() == cost[best_rows, best_columns].sum()


def test_a_clustering_is_scored_after_matching_its_labels_to_the_classes(tmp_path):
    truth = np.repeat(np.array([85, 170, 255], np.uint8), 40)[None].repeat(10, 0)
    clusters = np.select([truth == 85, truth == 170], [3, 1], 2).astype(np.uint16)
    clusters[0, :5] = 1  # a few pixels in the wrong cluster
    np.testing.assert_array_equal(matched_to_truth(clusters, truth)[1:], truth[1:])
    assert class_iou(matched_to_truth(clusters, truth), truth)[85] == (400 - 5) / 400
    tifffile.imwrite(tmp_path / "clusters.tif", clusters)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    unmatched = run_cli("score", str(tmp_path / "clusters.tif"), str(tmp_path / "truth.tif"))
    assert unmatched.returncode == 1
    assert "the prediction's values (1, 2, 3) share none with the ground truth's (85, 170, 255); for a clustering add --match" in unmatched.stderr
    matched = run_cli("score", str(tmp_path / "clusters.tif"), str(tmp_path / "truth.tif"), "--match")
    assert matched.returncode == 0, matched.stderr
    assert matched.stdout.splitlines()[-1].split()[0] == "mean" and float(matched.stdout.splitlines()[-1].split()[1]) > 0.98
