"""Volume inputs are read as the user meant, not as their files say (issue 27, item 5).

An OME-Zarr's dataset paths stay inside its store; an HDF5 dataset's samples inside its file; an http(s) store is
read only from hosts that DINOFEAT_HTTP_HOSTS passes (public addresses by default), redirects included; a declared
shape beyond the plane limit is refused before anything is allocated; malformed metadata is one sentence. The
refusals come before any work, so the command-line tests run without --dask; the http servers are real
`http.server`s on loopback (127.0.0.1, and 127.0.0.2 as "another service on the machine").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import dinofeat

pytest.importorskip("distributed")
import zarr  # noqa: E402
from dinofeat.contract.errors import DinofeatError  # noqa: E402
from dinofeat_server.volumes.remote import HostAllowance  # noqa: E402
from dinofeat_server.volumes.sources import open_volume  # noqa: E402

def ome_zarr(path: Path, data: np.ndarray) -> Path:
    """A real NGFF 0.4 image (ome-zarr's writer, one level at "s0") of a (Z, Y, X) volume."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    write_image(data, zarr.open_group(str(path), mode="w", zarr_format=2), axes="zyx", fmt=FormatV04(), scale_factors=[])
    return path


def with_dataset_path(store: Path, dataset: str) -> Path:
    """`store` with its first multiscales dataset path rewritten to `dataset`."""
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = dataset
    (store / ".zattrs").write_text(json.dumps(attrs))
    return store


@pytest.fixture()
def decoy(tmp_path) -> tuple[Path, Path]:
    """(decoy store, other store): a small valid image whose dataset path names another store's array by absolute path."""
    other = ome_zarr(tmp_path / "other.zarr", np.full((2, 32, 32), 200, np.uint8))
    decoy = ome_zarr(tmp_path / "decoy.zarr", np.zeros((2, 32, 32), np.uint8))
    return with_dataset_path(decoy, str(other / "s0")), other


def refused_in_one_line(result, *phrases: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def nothing_written(folder: Path) -> bool:
    return not list(folder.glob("out.zarr")) and not list(folder.glob(".out.zarr*"))


def test_an_ome_zarr_whose_dataset_path_is_absolute_is_refused_before_the_other_store_is_read(decoy, tmp_path):
    store, other = decoy
    result = dinofeat("features", str(store), "-o", str(tmp_path / "out.zarr"), "--device", "cpu", "--quiet")
    refused_in_one_line(result, f"names its image data '{other / 's0'}', a path outside the store")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("dataset", ["../other.zarr/s0", "s0/../../other.zarr/s0", "file:///etc", "./s0"])
def test_dataset_paths_that_climb_out_of_the_store_or_name_a_scheme_are_refused(decoy, dataset):
    store, _ = decoy
    with pytest.raises(DinofeatError, match="a path outside the store"):
        open_volume(with_dataset_path(store, dataset))


def test_a_dataset_path_through_a_symbolic_link_out_of_the_store_is_refused(decoy):
    store, other = decoy
    (store / "linked").symlink_to(other / "s0")
    with pytest.raises(DinofeatError, match="'linked', a path outside the store"):
        open_volume(with_dataset_path(store, "linked"))


def test_every_dataset_path_is_checked_not_only_the_full_resolution_one(decoy):
    store, other = decoy
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"] = [{"path": "s0"}, {"path": str(other / "s0")}]
    (store / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(DinofeatError, match="a path outside the store"):
        open_volume(store)


def test_a_worker_refuses_a_source_whose_dataset_path_leaves_the_store(decoy):
    """A VolumeSource travels to the workers as data: they check its dataset path themselves before reading."""
    store, other = decoy
    source = dataclasses.replace(open_volume(ome_zarr(store, np.zeros((2, 32, 32), np.uint8))), dataset=str(other / "s0"))
    assert "a path outside the store" in source.check_readable()


def external_storage(path: Path, outside: Path) -> Path:
    """An HDF5 file whose only dataset keeps its samples in `outside` (h5py's external storage)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", shape=(2, 16, 16), dtype="uint8", external=[(str(outside), 0, 512)])
    return path


def test_an_hdf5_dataset_with_external_storage_is_refused_so_no_outside_bytes_are_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 16)
    path = external_storage(tmp_path / "external.h5", secret)
    with pytest.raises(DinofeatError, match="external.h5/image keeps its samples in other files"):
        open_volume(path)


def test_hdf5_links_and_virtual_datasets_leading_to_other_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "target.h5", "w") as f:
        f["image"] = np.ones((2, 16, 16), np.uint8)
    with h5py.File(tmp_path / "links.h5", "w") as f:
        f["external"] = h5py.ExternalLink(str(tmp_path / "target.h5"), "/image")
        f["soft"] = h5py.SoftLink("/external")
        layout = h5py.VirtualLayout(shape=(2, 16, 16), dtype="uint8")
        layout[:] = h5py.VirtualSource(str(tmp_path / "target.h5"), "image", shape=(2, 16, 16))
        f.create_virtual_dataset("virtual", layout)
    for dataset, phrase in [("external", "outside the file"), ("soft", "outside the file"), ("virtual", "in other files")]:
        with pytest.raises(DinofeatError, match=phrase):
            open_volume(f"{tmp_path / 'links.h5'}/{dataset}")


def test_an_hdf5_soft_link_within_the_file_is_read(tmp_path):
    volume = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    with h5py.File(tmp_path / "inside.h5", "w") as f:
        f["group/image"] = volume
        f["alias"] = h5py.SoftLink("/group/image")
    source = open_volume(f"{tmp_path / 'inside.h5'}/alias")
    np.testing.assert_array_equal(source.plane(1), volume[1])


def huge_store(path: Path) -> Path:
    """An OME-Zarr that claims (2, 200000, 200000) uint8 (80 GB) and holds no chunk at all."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 200000, 200000), dtype="uint8", chunks=(1, 256, 256))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [{"path": "0"}]}]
    return path


def test_a_store_declaring_planes_beyond_the_limit_is_refused_before_anything_is_allocated(tmp_path):
    store = huge_store(tmp_path / "huge.zarr")
    result = dinofeat("features", str(store), "-o", str(tmp_path / "out.zarr"), "--device", "cpu", "--quiet")
    refused_in_one_line(result, "declares 2 planes of 200000 x 200000 pixels, beyond the limit", "DINOFEAT_MAX_PLANE_PIXELS")
    assert nothing_written(tmp_path)


def test_the_plane_limit_is_the_operators_to_set_and_covers_hdf5(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "large.h5", "w") as f:
        f.create_dataset("image", shape=(2, 300, 300), dtype="uint8", chunks=(1, 64, 64))
    assert open_volume(tmp_path / "large.h5").shape == (2, 300, 300)
    monkeypatch.setenv("DINOFEAT_MAX_PLANE_PIXELS", str(256 * 256))
    with pytest.raises(DinofeatError, match="300 x 300 pixels, beyond the limit of .* planes of 65536 pixels"):
        open_volume(tmp_path / "large.h5")


@pytest.mark.parametrize("zattrs", [
    '{"multiscales": [{"datasets": "s0"}]',                        # not JSON at all
    '{"multiscales": [{"datasets": "s0"}]}',                       # a string, not a list of datasets
    '{"multiscales": [{"datasets": [{"scale": 1}]}]}',             # a dataset without a path
    '{"multiscales": [{"datasets": [{"path": 0}]}]}',              # a path that is no string
    '{"multiscales": {"datasets": []}}',                           # multiscales not a list
    '{"multiscales": [{"datasets": [{"path": "s0"}], "axes": [{"type": "space"}]}]}',  # an axis without a name
])
def test_malformed_ome_zarr_metadata_is_one_sentence(tmp_path, zattrs):
    store = ome_zarr(tmp_path / "store.zarr", np.zeros((2, 32, 32), np.uint8))
    (store / ".zattrs").write_text(zattrs)
    with pytest.raises(DinofeatError, match="is not valid JSON|malformed OME-Zarr metadata"):
        open_volume(store)


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def redirector(target: str) -> type[BaseHTTPRequestHandler]:
    """A handler answering every request with a 302 to the same path on `target`."""

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    return Redirect


@contextlib.contextmanager
def serving(host: str, handler) -> Iterator[str]:
    """The base URL of a real `http.server` on `host` (a loopback address) with `handler`, in a thread."""
    server = ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def served(tmp_path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of a file server on 127.0.0.1 serving the folder, which holds stack.zarr (2, 32, 32) uint16."""
    folder = tmp_path / "served"
    ome_zarr(folder / "stack.zarr", np.arange(2 * 32 * 32, dtype=np.uint16).reshape(2, 32, 32))
    with serving("127.0.0.1", functools.partial(QuietFiles, directory=str(folder))) as base:
        yield folder, base


def test_an_http_store_on_loopback_is_refused_by_default(served, tmp_path):
    _, base = served
    result = dinofeat("features", f"{base}/stack.zarr", "-o", str(tmp_path / "out.zarr"), "--device", "cpu", "--quiet",
                      env={"DINOFEAT_HTTP_HOSTS": ""})
    refused_in_one_line(result, "would connect to 127.0.0.1", "not among the hosts http volumes may be read from (public)",
                        "DINOFEAT_HTTP_HOSTS=public,127.0.0.1")
    assert nothing_written(tmp_path)


def test_an_http_store_on_loopback_is_read_when_the_operator_allows_that_address(served, monkeypatch):
    _, base = served
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1")
    source = open_volume(f"{base}/stack.zarr")
    assert source.shape == (2, 32, 32) and source.plane(1)[0, 0] == 32 * 32


def test_a_redirect_to_a_host_outside_the_allowlist_is_not_followed(served, monkeypatch):
    folder, _ = served
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1")
    with serving("127.0.0.2", functools.partial(QuietFiles, directory=str(folder))) as other, \
            serving("127.0.0.1", redirector(other)) as redirecting:
        with pytest.raises(DinofeatError, match="would connect to 127.0.0.2"):
            open_volume(f"{redirecting}/stack.zarr")
        monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1,127.0.0.2")
        assert open_volume(f"{redirecting}/stack.zarr").plane(1)[0, 0] == 32 * 32


def test_workers_hold_every_read_to_the_allowance_the_volume_was_opened_with(served, monkeypatch):
    """The allowance travels inside the VolumeSource, so a worker refuses a host that the command's process refused."""
    _, base = served
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1")
    source = open_volume(f"{base}/stack.zarr")
    assert source.check_readable() is None
    narrowed = dataclasses.replace(source, hosts=HostAllowance(("public",)))
    assert "would connect to 127.0.0.1" in narrowed.check_readable()


def test_an_http_store_whose_dataset_path_leaves_it_is_refused(served, monkeypatch):
    folder, base = served
    ome_zarr(folder / "other.zarr", np.zeros((2, 32, 32), np.uint8))
    with_dataset_path(folder / "stack.zarr", "../other.zarr/s0")
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1")
    with pytest.raises(DinofeatError, match="'../other.zarr/s0', a path outside the store"):
        open_volume(f"{base}/stack.zarr")


def test_malformed_remote_metadata_is_one_sentence(served, monkeypatch):
    folder, base = served
    (folder / "stack.zarr" / ".zattrs").write_text('{"multiscales": [')
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", "127.0.0.1")
    with pytest.raises(DinofeatError, match="its Zarr metadata is not valid JSON"):
        open_volume(f"{base}/stack.zarr")


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/33", "data_lab"])
def test_a_malformed_allowlist_entry_is_one_sentence(entry, monkeypatch):
    monkeypatch.setenv("DINOFEAT_HTTP_HOSTS", f"127.0.0.1,{entry}")
    with pytest.raises(DinofeatError, match="DINOFEAT_HTTP_HOSTS holds"):
        open_volume("http://127.0.0.1:1/stack.zarr")


def test_the_allowance_reads_public_names_addresses_and_networks():
    allowance = HostAllowance(("public", "10.0.0.0/8", "::1"))
    assert [allowance.passes_address(a) for a in ("8.8.8.8", "10.2.3.4", "::1", "::ffff:127.0.0.1", "169.254.169.254",
                                                  "192.168.1.1", "100.64.0.1", "224.0.0.1")] == \
        [True, True, True, False, False, False, False, False]


def test_a_feature_store_with_edited_dinofeat_metadata_is_one_sentence(tmp_path):
    from dinofeat_server.volumes.zarr_io import create_feature_store, finish_store, open_features

    create_feature_store(tmp_path / ".partial", (2, 16, 16), ["raw", "sobel_s0"], {"feature_space": {}})
    store = finish_store(tmp_path / ".partial", tmp_path / "features.zarr")
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["dinofeat"]["channel_names"] = 5
    (store / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(DinofeatError, match="has malformed dinofeat metadata"):
        open_features(store)
