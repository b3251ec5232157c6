"""The client on bad output paths, full disks and a SIGKILL: one sentence and exit status 1, never a
traceback or a crash; nothing left outside the output's folder; a killed download resumes; a token
is not sent in clear beyond this machine."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from conftest import free_port
from dinofeat_client.client import FeatureClient, plaintext_token_refusal
from dinofeat_client.dataset_file import FLUSH_EVERY_CHUNKS, DatasetFile
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import atomic_write, output_file, output_folder, write_failure, writing


def run_cli(*args: str, limit_bytes: int | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `dinofeat` command in a fresh process; with `limit_bytes`, no file it writes may grow beyond
    that (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk, and no root is needed)."""
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "dinofeat_client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          preexec_fn=limited if limit_bytes else None, check=False)


def assert_one_sentence(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 1, no traceback, and exactly one line on stderr: the error's sentence, holding `fragments`."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinofeat: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> set[str]:
    """Every file and folder under `folder`, as paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """A folder of inputs beside the outputs: a smooth 64x96 image (its features compress well) and scribbles."""
    folder = tmp_path / "in"
    folder.mkdir()
    y, x = np.mgrid[0:64, 0:96]
    tifffile.imwrite(folder / "img.tif", (x * 2 + y).astype(np.uint8))
    return folder


def nowhere() -> str:
    """A loopback address where nothing listens: a command that got that far would say it cannot reach it."""
    return f"127.0.0.1:{free_port()}"


# -- the output-path policy: refused before any upload (a command that reached the server would say it cannot) --

def test_a_folder_given_as_an_output_file_is_refused_before_any_upload(inputs, tmp_path):
    (tmp_path / "out.h5").mkdir()
    result = run_cli("features", str(inputs / "img.tif"), "-o", str(tmp_path / "out.h5"), "--server", nowhere())
    assert_one_sentence(result, f"the output {tmp_path / 'out.h5'} is a folder; name a file")
    trailing = run_cli("segment", str(inputs / "img.tif"), "--labels", str(inputs / "img.tif"), "-o", f"{tmp_path / 'new'}/",
                       "--server", nowhere())
    assert_one_sentence(trailing, "names a folder, but a file is written here")
    assert files_under(tmp_path) == {"in", "in/img.tif", "out.h5"}


def test_a_file_given_as_an_output_folder_is_refused(inputs, tmp_path):
    (tmp_path / "results").write_text("a file")
    for command in (["fewshot", str(inputs / "img.tif"), "--support", str(inputs / "img.tif"), "--support-mask",
                     str(inputs / "img.tif")], ["demo"], ["ilastik", str(inputs / "img.tif")]):
        result = run_cli(*command, "-o", str(tmp_path / "results"), "--server", nowhere())
        assert_one_sentence(result, f"the output {tmp_path / 'results'} is a file, but a folder is needed here")
    assert files_under(tmp_path) == {"in", "in/img.tif", "results"}


def test_a_path_through_a_file_is_refused_and_missing_folders_are_created(inputs, tmp_path, server_address):
    result = run_cli("features", str(inputs / "img.tif"), "-o", str(inputs / "img.tif" / "sub" / "out.h5"), "--server", nowhere())
    assert_one_sentence(result, f"{inputs / 'img.tif'} is a file, not a folder; choose another path")
    made = run_cli("features", str(inputs / "img.tif"), "-o", str(tmp_path / "a" / "b" / "out.h5"), "--server", server_address)
    assert made.returncode == 0, made.stderr
    assert files_under(tmp_path) == {"in", "in/img.tif", "a", "a/b", "a/b/out.h5"}


def test_folders_created_for_a_command_that_fails_are_removed_again(inputs, tmp_path):
    result = run_cli("features", str(inputs / "img.tif"), "-o", str(tmp_path / "a" / "b" / "out.h5"), "--server", nowhere())
    assert_one_sentence(result, "cannot reach a dinofeat server")  # the folders were made, then the server was missing
    assert files_under(tmp_path) == {"in", "in/img.tif"}


def test_a_read_only_folder_is_refused_before_any_upload(inputs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write in a folder without write permission, so chmod cannot make one read-only here.")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli("features", str(inputs / "img.tif"), "-o", str(locked / "out.h5"), "--server", nowhere())
        assert_one_sentence(result, f"cannot write {locked / 'out.h5'}: this user may not write there (permission denied)")
        folder = run_cli("fewshot", str(inputs / "img.tif"), "--support", str(inputs / "img.tif"), "--support-mask",
                         str(inputs / "img.tif"), "-o", str(locked / "masks"), "--server", nowhere())
        assert_one_sentence(folder, f"cannot create the folder {locked / 'masks'}")
    finally:
        locked.chmod(0o755)
    assert files_under(locked) == set()


def test_a_read_only_file_system_and_a_forbidden_folder_are_named_as_such(tmp_path, monkeypatch):
    """Without a read-only mount at hand (or as root, without a forbidden folder), the probe file that
    output_file and output_folder create meets the errno such a folder gives."""
    import tempfile

    def refused(number: int):
        def probe(*args, **kwargs):
            raise OSError(number, os.strerror(number))
        return probe

    monkeypatch.setattr(tempfile, "TemporaryFile", refused(errno.EROFS))
    with pytest.raises(DinofeatError, match=re.escape(f"cannot write {tmp_path / 'x.h5'}: {tmp_path} is on a read-only file system")):
        output_file(tmp_path / "x.h5")
    with pytest.raises(DinofeatError, match="is on a read-only file system; write the output elsewhere"):
        output_folder(tmp_path / "sub")
    monkeypatch.setattr(tempfile, "TemporaryFile", refused(errno.EACCES))
    with pytest.raises(DinofeatError, match="this user may not write there \\(permission denied\\)"):
        output_file(tmp_path / "x.h5")


# -- failed writes: one sentence each, temporary files removed, a streamed result's partial file kept for a resume --

def test_every_kind_of_failed_write_gets_its_sentence():
    out = Path("/data/out.h5")
    sentences = {number: str(write_failure(OSError(number, os.strerror(number)), out))
                 for number in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EISDIR, errno.EDQUOT)}
    assert sentences[errno.ENOSPC] == ("cannot write /data/out.h5: the disk is full (no space left on device); free some space "
                                       "or write the output elsewhere, then run the command again.")
    assert "file too large" in sentences[errno.EFBIG] and "/data is on a read-only file system" in sentences[errno.EROFS]
    assert "permission denied" in sentences[errno.EACCES] and "it is a folder" in sentences[errno.EISDIR]
    assert "quota" in sentences[errno.EDQUOT]
    hdf5 = RuntimeError("Unable to synchronously flush file (unable to extend file properly, errno = 28, error message = "
                        "'No space left on device')")  # h5py's words, without an errno of its own
    assert "the disk is full" in str(write_failure(hdf5, out))
    assert all(s.count(". ") == 0 and s.endswith(".") for s in sentences.values())


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    def fill_the_disk(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DinofeatError, match="the disk is full"):
        atomic_write(tmp_path / "seg.tif", fill_the_disk)
    with pytest.raises(DinofeatError, match="the disk is full"), writing(tmp_path / "x.png"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert files_under(tmp_path) == set()


def test_a_full_disk_ends_features_with_one_sentence_and_a_resumable_partial_file(inputs, tmp_path):
    """The embedded server (no --server) in the same process: only files are limited, not memory."""
    result = run_cli("features", str(inputs / "img.tif"), "-o", str(tmp_path / "out" / "f.h5"), "--quiet", "--set", "classical",
                     limit_bytes=300_000)
    assert_one_sentence(result, f"cannot write {tmp_path / 'out' / 'f.h5.partial'}: the file would exceed the largest file",
                        "run the same command again: it resumes from the chunks kept in f.h5.partial")
    assert files_under(tmp_path) == {"in", "in/img.tif", "out", "out/f.h5.partial"}
    with h5py.File(tmp_path / "out" / "f.h5.partial", "r") as f:  # kept as of its last flush, not torn by the failure
        assert 0 < f["features"].id.get_num_chunks() < 58


def test_a_tiff_export_on_a_full_disk_leaves_nothing_behind(inputs, tmp_path, server_address):
    """The features (0.55 MB as HDF5) fit, their ImageJ TIFF (1.4 MB) does not."""
    result = run_cli("features", str(inputs / "img.tif"), "-o", str(tmp_path / "out" / "f.tif"), "--server", server_address,
                     limit_bytes=1_000_000)
    assert_one_sentence(result, f"cannot write {tmp_path / 'out' / 'f.tif'}: only part of it could be written")  # tifffile's short write
    assert files_under(tmp_path) == {"in", "in/img.tif"}  # "out" was created for this command, and removed once it failed empty


def test_an_unreadable_partial_file_is_reported_and_the_transfer_starts_over(tmp_path):
    (tmp_path / "f.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # an HDF5 signature, then nothing
    heard = []
    assert DatasetFile(tmp_path / "f.h5", key="k").resumable_indices(heard.append) is None
    assert heard == [(f"the partial file {tmp_path / 'f.h5.partial'} of an earlier run cannot be read (damaged), "
                      "so the transfer starts again from the beginning.")]


def test_a_download_killed_with_sigkill_resumes_from_the_chunks_on_disk(tmp_path, server_address):
    image = (np.random.default_rng(7).random((300, 280)) * 255).astype(np.uint8)  # the default multiscale set: 53 x 4 = 212 chunks
    tifffile.imwrite(tmp_path / "img.tif", image)
    output = tmp_path / "out" / "f.h5"
    command = [sys.executable, "-m", "dinofeat_client.cli", "features", str(tmp_path / "img.tif"), "-o", str(output),
               "--server", server_address]
    # One progress line per chunk into a one-page pipe: once the test stops reading, the client stops
    # within a few dozen chunks, so the kill lands mid-download however fast the stream is.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    client = subprocess.Popen(command, stderr=write_end, stdout=subprocess.DEVNULL,
                              env={**os.environ, "DINOFEAT_PROGRESS_SECONDS": "0", "PYTHONUNBUFFERED": "1"})
    os.close(write_end)
    received = 0
    with os.fdopen(read_end) as progress:
        for line in progress:
            found = re.search(r"receiving (\d+)/(\d+)", line)
            if found and int(found.group(1)) >= 100:
                received = int(found.group(1))
                client.send_signal(signal.SIGKILL)
                break
        client.wait(timeout=60)
    assert received and client.returncode == -signal.SIGKILL
    assert not output.exists() and files_under(tmp_path / "out") == {"f.h5.partial"}

    start = time.monotonic()
    resumed = run_cli(*command[3:])
    assert resumed.returncode == 0, resumed.stderr
    fetched = re.search(r"resumed: (\d+) of 212 chunks fetched now", resumed.stdout)
    assert fetched and int(fetched.group(1)) <= 212 - received + FLUSH_EVERY_CHUNKS, resumed.stdout  # kept: all flushed ones
    assert files_under(tmp_path / "out") == {"f.h5"}
    with FeatureClient(server_address) as whole:
        whole.fetch_features(image, tmp_path / "whole.h5")
    with h5py.File(output, "r") as a, h5py.File(tmp_path / "whole.h5", "r") as b:
        ours, theirs = a["features"], b["features"]
        assert sorted(ours.attrs) == sorted(theirs.attrs)
        assert all(np.array_equal(ours.attrs[name], theirs.attrs[name]) for name in theirs.attrs)
        for index in range(theirs.id.get_num_chunks()):
            offset = theirs.id.get_chunk_info(index).chunk_offset
            assert ours.id.read_direct_chunk(offset) == theirs.id.read_direct_chunk(offset)  # the stored bytes themselves
    assert time.monotonic() - start < 60


# -- tokens: never in clear beyond this machine unless told --

def this_machines_other_address() -> str | None:
    """A non-loopback IPv4 address of this machine (`hostname -I`), or None."""
    try:
        found = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5, check=False).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in found if "." in a and not a.startswith("127.")), None)


def test_loopback_addresses_may_carry_a_token_in_clear_and_others_may_not():
    for address in ("127.0.0.1:50051", "127.8.9.10:1", "[::1]:50051", "localhost:50051", "unix:/tmp/dinofeat.sock"):
        assert plaintext_token_refusal(address) is None, address
    for address in ("10.1.2.3:50051", "[2001:db8::1]:50051", "gpu-box.invalid:50051"):
        refusal = plaintext_token_refusal(address)
        assert refusal and "refusing to send the access token in clear to" in refusal and "--tls-ca" in refusal, address
    with pytest.raises(DinofeatError, match="refusing to send the access token in clear to 10.1.2.3"):
        FeatureClient("10.1.2.3:50051", token="secret")


def test_the_cli_refuses_a_token_in_clear_to_another_machine_unless_told(tmp_path):
    host = this_machines_other_address() or "192.0.2.1"  # TEST-NET: never reached, the refusal comes first
    (tmp_path / "token").write_text("secret-token-for-tests\n")
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    common = ["features", str(tmp_path / "img.tif"), "-o", str(tmp_path / "out.h5"), "--token-file", str(tmp_path / "token")]
    port = free_port()
    refused = run_cli(*common, "--server", f"{host}:{port}")
    assert_one_sentence(refused, f"refusing to send the access token in clear to {host}, which is not this machine",
                        "pass --tls-ca CA.pem", "--insecure-token")
    loopback = run_cli(*common, "--server", f"127.0.0.1:{port}")
    assert_one_sentence(loopback, "nothing listens there")  # the token may go: the connection is tried
    if this_machines_other_address():
        for told in ({"args": ["--insecure-token"]}, {"env": {"DINOFEAT_INSECURE_TOKEN": "1"}}):
            sent = run_cli(*common, "--server", f"{host}:{port}", *told.get("args", []), env=told.get("env"))
            assert_one_sentence(sent, "nothing listens there")
    assert files_under(tmp_path) == {"img.tif", "token"}
