"""Every kind of bad input gets one clear sentence, exit status 1, and no output file.

The commands run by their own main() against the in-process server (conftest.run_cli); `serve` runs as a process."""

from __future__ import annotations

import socket

import imagecodecs
import numpy as np
import pytest
import tifffile
from conftest import dinofeat, free_port, run_cli
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import check_image


def assert_refused(result, message: str, folder) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinofeat: error: "), result.stderr
    assert message in lines[0]
    assert not [p for p in folder.iterdir() if p.name.startswith(("out", ".out"))], list(folder.iterdir())


@pytest.fixture()
def good_image(tmp_path):
    path = tmp_path / "good.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8))
    return path


def test_random_bytes_are_not_an_image(tmp_path, inprocess_address):
    (tmp_path / "noise.tif").write_bytes(np.random.default_rng(0).bytes(5000))
    result = run_cli("features", str(tmp_path / "noise.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "not a readable TIFF, PNG or JPEG image, or the file is truncated", tmp_path)


def test_truncated_png_is_reported(tmp_path, inprocess_address):
    png = imagecodecs.png_encode(np.zeros((64, 64), np.uint8) + 7)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    result = run_cli("features", str(tmp_path / "cut.png"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "cannot read", tmp_path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_tiff_is_reported(tmp_path, inprocess_address, keep):
    tifffile.imwrite(tmp_path / "whole.tif", (np.random.default_rng(1).random((128, 128)) * 65535).astype(np.uint16))
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: int(len(data) * keep)])
    result = run_cli("features", str(tmp_path / "cut.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "cut.tif", tmp_path)


def test_missing_image_file(tmp_path, inprocess_address):
    result = run_cli("features", str(tmp_path / "absent.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "no such file", tmp_path)


def test_unsupported_sample_type(tmp_path, inprocess_address):
    tifffile.imwrite(tmp_path / "c.tif", np.ones((20, 20), np.complex64))
    result = run_cli("features", str(tmp_path / "c.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "complex64, which is not supported", tmp_path)


def test_nan_and_inf_are_refused(tmp_path, inprocess_address):
    image = np.ones((20, 20), np.float32)
    image[3, 4] = np.nan
    image[5, 5] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", image)
    result = run_cli("features", str(tmp_path / "nan.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "contains NaN or infinite values", tmp_path)


def test_empty_image_is_refused():
    with pytest.raises(DinofeatError, match=r"is empty \(shape \(0, 5\)\)"):
        check_image(np.zeros((0, 5), np.uint8))


def test_one_pixel_wide_image_is_refused(tmp_path, inprocess_address):
    tifffile.imwrite(tmp_path / "line.tif", np.zeros((1, 50), np.uint8))
    result = run_cli("features", str(tmp_path / "line.tif"), "-o", str(tmp_path / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "too small", tmp_path)


def test_labels_of_another_shape(tmp_path, good_image, inprocess_address):
    tifffile.imwrite(tmp_path / "lab.tif", np.ones((30, 40), np.uint8))
    result = run_cli("segment", str(good_image), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "out.tif"),
                      "--server", inprocess_address)
    assert_refused(result, "the label image has shape (30, 40) but the image has (40, 40)", tmp_path)


@pytest.mark.parametrize("shape", [(1, 40, 40), (40, 40, 1)])
def test_labels_saved_with_a_length_one_axis_are_used(tmp_path, good_image, inprocess_address, shape):
    labels = np.zeros((40, 40), np.uint8)
    labels[2:10, 2:10], labels[30:38, 30:38] = 1, 2
    tifffile.imwrite(tmp_path / "lab.tif", labels.reshape(shape))
    assert tifffile.imread(tmp_path / "lab.tif").shape == shape
    result = run_cli("segment", str(good_image), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "seg.tif"),
                      "--set", "classical", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(tmp_path / "seg.tif").shape == (40, 40)


def test_an_image_saved_as_one_slice_is_a_2d_image():
    image = check_image(np.zeros((1, 1, 30, 20), np.uint8))
    assert image.shape == (30, 20)


def test_labels_that_still_differ_after_dropping_length_one_axes_are_refused(tmp_path, good_image, inprocess_address):
    tifffile.imwrite(tmp_path / "lab.tif", np.ones((1, 30, 40), np.uint8))
    result = run_cli("segment", str(good_image), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "out.tif"),
                      "--server", inprocess_address)
    assert_refused(result, "the label image has shape (30, 40) but the image has (40, 40)", tmp_path)


def test_a_support_mask_saved_as_one_slice_is_used(tmp_path, good_image, inprocess_address):
    mask = np.zeros((1, 40, 40), np.uint8)
    mask[0, 10:30, 10:30] = 255
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    folder = tmp_path / "fewshot"
    folder.mkdir()
    result = run_cli("fewshot", str(good_image), "--support", str(good_image), "--support-mask", str(tmp_path / "mask.tif"),
                      "-o", str(folder), "--set", "classical", "--server", inprocess_address)
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(folder / "good_mask.tif").shape == (40, 40)


def test_labels_with_a_single_class(tmp_path, good_image, inprocess_address):
    labels = np.zeros((40, 40), np.uint8)
    labels[5:9, 5:9] = 3
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    result = run_cli("segment", str(good_image), "--labels", str(tmp_path / "lab.tif"), "-o", str(tmp_path / "out.tif"),
                      "--server", inprocess_address)
    assert_refused(result, "1 class(es) besides 0 (unlabelled); label at least two classes", tmp_path)


def test_output_in_a_folder_that_cannot_be_created(tmp_path, good_image, inprocess_address):
    (tmp_path / "blocker").write_text("a file where a folder would go")  # a missing folder is created (outputs.py)
    result = run_cli("features", str(good_image), "-o", str(tmp_path / "blocker" / "out.h5"), "--server", inprocess_address)
    assert_refused(result, "is a file, not a folder; choose another path", tmp_path)


def test_server_that_is_not_there(tmp_path, good_image):
    address = f"127.0.0.1:{free_port()}"
    result = run_cli("features", str(good_image), "-o", str(tmp_path / "out.h5"), "--server", address)
    assert_refused(result, f"cannot reach a dinofeat server at {address}", tmp_path)


def test_port_already_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dinofeat("serve", "--port", str(port), "--device", "cpu")
    assert_refused(result, f"cannot listen on 127.0.0.1:{port}", tmp_path)


def test_non_loopback_address_without_protection(tmp_path):
    result = dinofeat("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--device", "cpu")
    assert_refused(result, "would expose the server beyond this machine", tmp_path)
