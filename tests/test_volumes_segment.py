"""A trained model over a volume as Dask tasks into an OME-Zarr label image (issue 18): apply, segment, the pyramid,
TLS to the scheduler, --like a .zarr store, and bad input, on a 2-worker LocalCluster (processes).

The references are the real commands without Dask (`dinofeat apply MODEL STACK -o ref.tif`, `dinofeat segment ...`),
computed by the embedded server on the whole stack; models come from `dinofeat train` on the classical set. Commands
run in this process (`cli.main`), which has torch loaded already: a new process per command would double the time.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import tifffile

pytest.importorskip("distributed")
import zarr  # noqa: E402
from dinofeat_client.cli import main  # noqa: E402
from dinofeat_client.spaces import read_space  # noqa: E402
from dinofeat.contract.computation import FeatureComputation  # noqa: E402
from dinofeat_server.volumes import classify_to_zarr, open_features  # noqa: E402
from dinofeat_server.volumes.classify import labelled_samples  # noqa: E402
from dinofeat_server.volumes.dask_run import fitted_on, request_for  # noqa: E402
from dinofeat_server.volumes.sources import open_volume  # noqa: E402
from dinofeat_server.volumes.tasks import fit_volume  # noqa: E402
from dinofeat_server.volumes.zarr_io import halved  # noqa: E402
import test_volumes_dask  # noqa: E402

cluster = test_volumes_dask.cluster
"""The same fixture (a LocalCluster of 2 worker processes, 1 thread each), one per module."""

TREES = ("--trees", "10", "--device", "cpu", "--quiet")
"""The default set (multiscale): its features are the same bits on a one-thread Dask worker as on this process's threads."""


def dinofeat(*args: str) -> None:
    """Run `dinofeat ARGS` in this process; a failure shows its one sentence."""
    import io
    from contextlib import redirect_stderr

    error = io.StringIO()
    with redirect_stderr(error):
        status = main(list(args))
    assert status == 0, error.getvalue()


def stack_and_scribbles() -> tuple[np.ndarray, np.ndarray]:
    """A (3, 80, 96) uint8 stack (test_volumes_dask's blurred noise) and scribbles of three classes on slice 1 only."""
    image = test_volumes_dask.smooth_volume((3, 80, 96))
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 5:15, 5:40], labels[1, 50:60, 30:80], labels[1, 30:35, :] = 1, 2, 3
    return image, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The stack, its scribbles and a model trained on them by `dinofeat train` (paths)."""
    folder = tmp_path_factory.mktemp("segment")
    image, labels = stack_and_scribbles()
    tifffile.imwrite(folder / "stack.tif", image, photometric="minisblack")
    tifffile.imwrite(folder / "labels.tif", labels, photometric="minisblack")
    dinofeat("train", str(folder / "stack.tif"), "--labels", str(folder / "labels.tif"), "-o", str(folder / "m.dfm"), *TREES)
    return {"stack": str(folder / "stack.tif"), "labels": str(folder / "labels.tif"), "model": str(folder / "m.dfm")}


def level(store, name: str = "0") -> np.ndarray:
    """The whole array `name` (a pyramid level) of an OME-Zarr store."""
    return zarr.open_group(str(store), mode="r")[name][:]


def test_apply_on_two_dask_workers_equals_apply_without_dask_with_its_pyramid_and_probabilities(data, cluster, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    dinofeat("apply", data["model"], data["stack"], "-o", str(tmp_path / "ref.tif"), "--probabilities", str(tmp_path / "ref.h5"),
             "--device", "cpu", "--quiet")
    output = tmp_path / "out.zarr"
    dinofeat("apply", data["model"], data["stack"], "-o", str(output), "--dask", cluster.scheduler.address, "--pyramid", "2",
             "--probabilities", "--device", "cpu", "--quiet")
    expected = tifffile.imread(tmp_path / "ref.tif")
    labels = level(output)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {1, 2, 3}
    np.testing.assert_array_equal(labels, expected)
    with h5py.File(tmp_path / "ref.h5", "r") as f:
        np.testing.assert_allclose(level(tmp_path / "out.probabilities.zarr"), f["probabilities"][()], atol=1e-6)
    assert [level(output, str(k)).shape for k in range(3)] == [(3, 80, 96), (3, 40, 48), (3, 20, 24)]
    np.testing.assert_array_equal(level(output, "1")[2], halved(labels[2]))
    np.testing.assert_array_equal(level(output, "2")[0], halved(halved(labels[0])))
    node = next(iter(Reader(parse_url(str(output)))()))
    assert node.first(Label) and node.first(Multiscales)
    assert [tuple(d.shape) for d in node.data] == [(3, 80, 96), (3, 40, 48), (3, 20, 24)]
    assert sorted(node.metadata["properties"]) == [1, 2, 3]
    assert not list(tmp_path.glob(".out*")), "no partial store is left beside the outputs"
    here = classify_to_zarr(data["stack"], data["model"], tmp_path / "here.zarr", device="cpu")[0]  # no Dask: same code
    np.testing.assert_array_equal(level(here), expected)


def test_segment_and_train_on_two_dask_workers_equal_segment_without_dask(data, cluster, tmp_path):
    dinofeat("segment", data["stack"], "--labels", data["labels"], "-o", str(tmp_path / "ref.tif"), *TREES)
    expected = tifffile.imread(tmp_path / "ref.tif")
    dinofeat("segment", data["stack"], "--labels", data["labels"], "-o", str(tmp_path / "seg.zarr"), *TREES,
             "--dask", cluster.scheduler.address)
    np.testing.assert_array_equal(level(tmp_path / "seg.zarr"), expected)
    attributes = json.loads((tmp_path / "seg.zarr" / ".zattrs").read_text())["dinofeat"]
    assert attributes["complete"] and attributes["class_values"] == [1, 2, 3] and attributes["classifier"]["trees"] == 10
    dinofeat("train", data["stack"], "--labels", data["labels"], "-o", str(tmp_path / "v.dfm"), *TREES,
             "--dask", cluster.scheduler.address)
    np.testing.assert_array_equal(level(classify_to_zarr(data["stack"], tmp_path / "v.dfm", tmp_path / "v.zarr")[0]), expected)


def test_only_labelled_slices_compute_training_features(data):
    fitted = fitted_on(None, fit_volume, request_for(data["stack"], FeatureComputation("classical"), "cpu", None), None)
    labels = open_volume(data["labels"])
    assert labelled_samples(0, fitted, labels) is None and labelled_samples(2, fitted, labels) is None
    samples, classes = labelled_samples(1, fitted, labels)
    assert samples.shape == (int((tifffile.imread(data["labels"]) > 0).sum()), len(fitted.channel_names))
    assert set(np.unique(classes)) == {1, 2, 3}


def self_signed(folder) -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed certificate for localhost, its own CA."""
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_a_tls_scheduler_runs_the_apply_and_a_mismatch_of_scheme_and_flags_gets_one_sentence(data, tmp_path, capsys):
    from distributed import LocalCluster, Security

    cert, key = self_signed(tmp_path)
    security = Security(tls_ca_file=cert, tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert,
                        tls_worker_key=key, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    tls = ("--dask-tls-ca", cert, "--dask-tls-cert", cert, "--dask-tls-key", key)
    common = ("apply", data["model"], data["stack"], "--device", "cpu", "--quiet")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", protocol="tls",
                      security=security) as local:  # a worker in this process: the TLS is the same, the start faster
        address = local.scheduler_address
        assert address.startswith("tls://")
        dinofeat(*common, "-o", str(tmp_path / "tls.zarr"), "--dask", address, *tls)
        assert main([*common, "-o", str(tmp_path / "bare.zarr"), "--dask", address]) == 1
        assert capsys.readouterr().err == (f"dinofeat: error: {address} is a TLS scheduler: give --dask-tls-ca, --dask-tls-cert "
                                           "and --dask-tls-key (PEM files: the CA that signed the scheduler's certificate, "
                                           "this client's certificate and its key).\n")
    reference = classify_to_zarr(data["stack"], data["model"], tmp_path / "here.zarr", device="cpu")[0]
    np.testing.assert_array_equal(level(tmp_path / "tls.zarr"), level(reference))
    plain = "tcp://127.0.0.1:8786"
    assert main([*common, "-o", str(tmp_path / "plain.zarr"), "--dask", plain, *tls]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"dinofeat: error: --dask-tls-ca, --dask-tls-cert, --dask-tls-key secure a tls:// scheduler, but {plain} "
                            "is not one") and error.count("\n") == 1
    assert main([*common, "-o", str(tmp_path / "plain.zarr"), "--dask", "local", "--dask-tls-ca", cert]) == 1
    assert capsys.readouterr().err.startswith("dinofeat: error: --dask-tls-ca secure a tls:// scheduler, but local is not one")


def test_bad_input_gets_one_sentence_each(data, tmp_path, capsys):
    stack, model = data["stack"], data["model"]
    (tmp_path / "notes.dfm").write_text("not a model")
    assert main(["apply", str(tmp_path / "notes.dfm"), stack, "-o", str(tmp_path / "a.zarr"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert error == (f"dinofeat: error: {tmp_path / 'notes.dfm'}: this is not a dinofeat model file, or it is damaged "
                     "(train one with `dinofeat train`).\n")
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("keep me")
    assert main(["apply", model, stack, "-o", str(other), "--quiet", "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert error == (f"dinofeat: error: the output {other} exists and is a folder that dinofeat did not write; choose another "
                     "name, or pass --overwrite to replace it.\n")
    assert (other / "keep.txt").exists()
    assert main(["segment", stack, "--labels", data["labels"], "-o", str(tmp_path / "s.zarr"), "--probabilities",
                 str(other), *TREES]) == 1
    assert "exists and is a folder that dinofeat did not write" in capsys.readouterr().err
    assert main(["apply", model, stack, "-o", str(tmp_path / "p.zarr"), "--pyramid", "-1", "--quiet"]) == 1
    assert capsys.readouterr().err == "dinofeat: error: --pyramid takes 0 to 8 downsampled levels, not -1.\n"
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "a.zarr").exists()


def test_features_like_a_zarr_store_take_its_feature_space(data, tmp_path, capsys):
    first = tmp_path / "first.zarr"
    assert main(["features", data["stack"], "-o", str(first), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["features", data["stack"], "-o", str(tmp_path / "like.zarr"), "--like", str(first), "--device", "cpu",
                 "--quiet"]) == 0
    assert open_features(tmp_path / "like.zarr")[2].to_dict() == open_features(first)[2].to_dict()
    assert main(["features", data["stack"], "-o", str(tmp_path / "like.h5"), "--like", str(first), "--device", "cpu",
                 "--quiet"]) == 0
    assert json.loads(read_space(tmp_path / "like.h5")) == open_features(first)[2].to_dict()
    (tmp_path / "empty.zarr").mkdir()
    assert main(["features", data["stack"], "-o", str(tmp_path / "x.zarr"), "--like", str(tmp_path / "empty.zarr"),
                 "--quiet"]) == 1
    assert capsys.readouterr().err == (f"dinofeat: error: {tmp_path / 'empty.zarr'} is not an OME-Zarr store that dinofeat "
                                       "wrote; --like takes a feature file (.h5 or .zarr) or a model (.dfm).\n")
