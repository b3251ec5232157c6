"""Volumes as Dask tasks into OME-Zarr, and lazy dask arrays (issue 18, items 2-4), on a 2-worker LocalCluster.

The reference is the single-server result: the real `dinofeat features VOLUME.tif -o ref.h5` (embedded server).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tifffile
from conftest import dinofeat, free_port

pytest.importorskip("distributed")
from dinofeat.contract.errors import DinofeatError  # noqa: E402
from dinofeat_client.spaces import read_space  # noqa: E402
from dinofeat_server.engine.space import FeatureSpace  # noqa: E402
from dinofeat.contract.computation import FeatureComputation  # noqa: E402
from dinofeat_server.volumes import (  # noqa: E402
    features_to_zarr,
    fitted_features,
    lazy_features,
    open_features,
    open_volume,
)

TINY_DEEP = {"set": "dinov2", "preset": "fast", "pca": 4, "normalise": "minmax"}


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A uint8 volume with structure at several scales (blurred noise), so every filter has something to see."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).random(shape)
    image = gaussian_filter(noise, (0, 2, 2)) + 0.3 * noise
    return np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("volume") / "volume.tif"
    tifffile.imwrite(path, smooth_volume((4, 96, 96)), photometric="minisblack")
    return str(path)


@pytest.fixture(scope="module")
def classical_reference(volume, tmp_path_factory):
    """(features, space, channel names) of `dinofeat features volume.tif -o ref.h5` (classical)."""
    output = tmp_path_factory.mktemp("reference") / "ref.h5"
    features, space = reference(volume, output)
    with h5py.File(output, "r") as f:
        return features, space, list(f["features"].attrs["channel_names"])


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, 1 thread each, and its client."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, Client(local) as client:
        yield client


def reference(volume: str, output, *extra: str) -> tuple[np.ndarray, FeatureSpace]:
    """The single-server result: features (C, Z, Y, X) and space of `dinofeat features VOLUME -o ref.h5`."""
    result = dinofeat("features", volume, "-o", str(output), "--device", "cpu", "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    with h5py.File(output, "r") as f:
        features = f["features"][()]
    return features, FeatureSpace.from_dict(json.loads(read_space(output)))


def assert_same_space(a: FeatureSpace, b: FeatureSpace) -> None:
    assert a.identity == b.identity and np.allclose(a.input_range, b.input_range)
    for name in ("mean", "components", "shift", "scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_cli_on_two_dask_workers_writes_the_single_server_features_as_ome_zarr(volume, cluster, classical_reference, tmp_path):
    expected, expected_space, expected_names = classical_reference
    result = dinofeat("features", volume, "-o", str(tmp_path / "out.zarr"), "--dask", cluster.scheduler.address,
                      "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    features, names, space = open_features(tmp_path / "out.zarr")
    assert features.shape == expected.shape and features.chunks == (1, 1, 96, 96)
    np.testing.assert_allclose(features[:], expected, rtol=1e-5, atol=1e-5)
    assert_same_space(space, expected_space)
    assert names == expected_names
    assert not list(tmp_path.glob(".out.zarr*")), "no partial store is left beside the output"


def test_the_ome_zarr_output_opens_with_ome_zarrs_reader_and_shows_the_channel_names(volume, cluster, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    output = features_to_zarr(volume, tmp_path / "features.zarr", FeatureComputation("classical"), device="cpu", client=cluster)
    node = next(iter(Reader(parse_url(str(output)))()))
    _, names, _ = open_features(output)
    assert node.metadata["channel_names"] == names and names[:2] == ["raw", "sobel_s0"]
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert node.data[0].shape == (len(names), 4, 96, 96)
    assert json.loads((output / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"
    assert json.loads((output / "0" / ".zarray").read_text())["zarr_format"] == 2


def test_a_deep_set_on_two_workers_equals_the_single_server_result_in_one_space(volume, cluster, tiny_weights, tmp_path):
    expected, expected_space = reference(volume, tmp_path / "ref.h5", "--set", TINY_DEEP["set"], "--preset", TINY_DEEP["preset"],
                                         "--pca", str(TINY_DEEP["pca"]), "--normalise", TINY_DEEP["normalise"],
                                         "--weights", str(tiny_weights))
    options = FeatureComputation(TINY_DEEP["set"], preset=TINY_DEEP["preset"], pca=TINY_DEEP["pca"], normalise=TINY_DEEP["normalise"])
    output = features_to_zarr(volume, tmp_path / "deep.zarr", options, device="cpu",
                              weights={"dinov2_vits14": str(tiny_weights)}, client=cluster)
    features, names, space = open_features(output)
    assert names == [f"dino_pca_{i:02d}" for i in range(4)]
    assert_same_space(space, expected_space)
    np.testing.assert_allclose(features[:], expected, rtol=1e-3, atol=1e-3)


def test_killing_a_worker_mid_run_still_gives_a_complete_and_correct_output(cluster, tmp_path):
    path = tmp_path / "long.tif"
    tifffile.imwrite(path, smooth_volume((6, 128, 128), seed=1), photometric="minisblack")
    pids = cluster.run(os.getpid)
    killed = []

    def kill_a_busy_worker(stage: str, done: int, total: int) -> None:
        if stage == "slices" and done == 1 and not killed:
            busy = [worker for worker, keys in cluster.processing().items() if keys] or list(pids)
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(busy[0])

    output = features_to_zarr(str(path), tmp_path / "long.zarr", FeatureComputation("classical"), device="cpu", client=cluster,
                              progress=kill_a_busy_worker)
    assert killed, "a worker was killed during the run"
    features, _, space = open_features(output)
    expected = lazy_features(str(path), FeatureComputation("classical"), device="cpu").compute(scheduler="synchronous")
    np.testing.assert_array_equal(features[:], expected)
    deadline = time.monotonic() + 30
    while len(cluster.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(cluster.run(os.getpid).values()) != set(pids.values()), "the nanny replaced the killed worker"


def test_the_lazy_dask_array_equals_the_eager_result_locally_and_on_the_cluster(volume, cluster, tmp_path):
    output = features_to_zarr(volume, tmp_path / "eager.zarr", FeatureComputation("classical"), device="cpu")
    eager, names, _ = open_features(output)
    array, fitted = fitted_features(volume, FeatureComputation("classical"), device="cpu", client=cluster)
    assert array.shape == eager.shape and array.chunks[1] == (1, 1, 1, 1) and fitted.channel_names == names
    np.testing.assert_allclose(cluster.compute(array[:, 1:3]).result(), eager[:, 1:3], atol=1e-6)  # workers: 1 thread
    in_memory = lazy_features(tifffile.imread(volume), FeatureComputation("classical"), device="cpu")
    np.testing.assert_allclose(in_memory.compute(scheduler="synchronous"), eager[:], atol=1e-6)
    plane = lazy_features(tifffile.imread(volume)[2], FeatureComputation("classical"), device="cpu")
    assert plane.shape == (len(names), 96, 96)
    np.testing.assert_allclose(plane.compute(scheduler="synchronous"), eager[:, 2], atol=1e-6)


def test_the_cli_without_dask_writes_ome_zarr_in_process_and_refuses_to_replace_other_folders(volume, classical_reference, tmp_path):
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = dinofeat("features", volume, "-o", str(other), "--device", "cpu", "--quiet")
    assert result.returncode == 1 and (other / "notes.txt").exists()
    assert result.stderr.count("\n") == 1 and "exists and is a folder that dinofeat did not write" in result.stderr
    assert "--overwrite" in result.stderr
    result = dinofeat("features", volume, "-o", str(other), "--device", "cpu", "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (other / "notes.txt").exists()
    np.testing.assert_allclose(open_features(other)[0][:], classical_reference[0], rtol=1e-5, atol=1e-5)


def test_an_unreachable_scheduler_gets_one_sentence_within_seconds(volume, tmp_path):
    start = time.monotonic()
    address = f"tcp://127.0.0.1:{free_port()}"
    result = dinofeat("features", volume, "-o", str(tmp_path / "out.zarr"), "--dask", address, "--quiet")
    assert result.returncode == 1 and time.monotonic() - start < 20
    assert result.stderr.startswith(f"dinofeat: error: cannot reach the Dask scheduler at {address} within 5 s")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out.zarr").exists()


def test_a_worker_that_cannot_read_the_volume_is_named_with_the_path(volume, cluster, tmp_path):
    path = tmp_path / "gone.tif"
    tifffile.imwrite(path, smooth_volume((2, 32, 32)), photometric="minisblack")
    source = open_volume(str(path))
    path.unlink()
    with pytest.raises(DinofeatError, match=r"^worker tcp://127\.0\.0\.1:\d+ cannot read " + str(path) + ": "):
        features_to_zarr(source, tmp_path / "out.zarr", FeatureComputation("classical"), device="cpu", client=cluster)
    assert not (tmp_path / "out.zarr").exists()


def test_a_worker_without_the_weights_names_the_weights_it_lacks(volume, cluster, tmp_path):
    missing = tmp_path / "absent" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(DinofeatError, match=r"^worker tcp://127\.0\.0\.1:\d+ lacks the weights file " + str(missing)):
        features_to_zarr(volume, tmp_path / "out.zarr", FeatureComputation("dinov2"), device="cpu", weights={"dinov2_vits14": str(missing)},
                         client=cluster)


def test_ome_zarr_and_hdf5_volumes_give_the_features_of_the_same_tiff_stack(volume, tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image
    import zarr

    stack = tifffile.imread(volume)
    group = zarr.open_group(str(tmp_path / "input.zarr"), mode="w", zarr_format=2)
    write_image(stack[None], group, axes="czyx", fmt=FormatV04(), scale_factors=[])
    with h5py.File(tmp_path / "input.h5", "w") as f:
        f["raw/volume"] = stack
    expected = lazy_features(volume, device="cpu").compute(scheduler="synchronous")
    for path in (tmp_path / "input.zarr", tmp_path / "input.h5", f"{tmp_path / 'input.h5'}/raw/volume"):
        source = open_volume(path)
        assert source.shape == stack.shape and source.volume, path
        np.testing.assert_array_equal(lazy_features(path, device="cpu").compute(scheduler="synchronous"), expected)


def listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def http_folder(tmp_path):
    """(folder, base URL) of a real HTTP server (python -m http.server) serving `folder` on loopback."""
    folder = tmp_path / "served"
    folder.mkdir()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not listens(port):
            assert time.monotonic() < deadline and server.poll() is None, "the HTTP server did not start"
            time.sleep(0.1)
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_workers_read_an_ome_zarr_by_url_and_give_the_features_of_the_local_stack(volume, cluster, classical_reference,
                                                                                   http_folder, tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image
    import zarr

    folder, base = http_folder
    write_image(tifffile.imread(volume), zarr.open_group(str(folder / "stack.zarr"), mode="w", zarr_format=2), axes="zyx",
                fmt=FormatV04(), scale_factors=[])
    loopback = {"DINOFEAT_HTTP_HOSTS": "127.0.0.1"}  # http volumes come from public addresses only, unless the operator allows more
    result = dinofeat("features", f"{base}/stack.zarr", "-o", str(tmp_path / "remote.zarr"), "--dask", cluster.scheduler.address,
                      "--quiet", env=loopback)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(open_features(tmp_path / "remote.zarr")[0][:], classical_reference[0], rtol=1e-5, atol=1e-5)
    result = dinofeat("features", f"{base}/absent.zarr", "-o", str(tmp_path / "absent.zarr"), "--quiet", env=loopback)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"cannot read {base}/absent.zarr: not an OME-Zarr at that URL" in result.stderr
