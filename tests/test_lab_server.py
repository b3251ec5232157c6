"""A lab's shared server under load and faults: real `dinofeat serve` processes on loopback, real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ServerProcess, dinofeat, noise, wait_for
from dinofeat_client.client import FeatureClient
from dinofeat.contract.computation import DEFAULT_SET
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.image_files import write_tiff
from dinofeat_server.engine.stacks import FEATURE_SETS, intensity_scaled


def stored_chunks(path: Path) -> dict[tuple[int, ...], bytes]:
    """Every chunk of `features` as HDF5 stores it, by offset."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        return {tuple(ds.id.get_chunk_info(i).chunk_offset): ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)[1]
                for i in range(ds.id.get_num_chunks())}


USERS = [f"user{number}" for number in range(17)]


def token_file(folder: Path, users: list[str]) -> Path:
    """A token file naming each user's token (`name token` lines): users on one host are told apart by them."""
    path = folder / "tokens.txt"
    path.write_text("".join(f"{user} token-of-{user}-for-tests\n" for user in users))
    return path


@pytest.fixture()
def server():
    process = ServerProcess("--workers", "2")
    yield process
    process.stop()


@pytest.fixture()
def lab_server(tmp_path):
    """A server whose users each have a named token (users on one host are one client without tokens)."""
    process = ServerProcess("--workers", "2", "--token-file", str(token_file(tmp_path, USERS)))
    yield process
    process.stop()


def fetch_in_processes(server: ServerProcess, images: list[Path]) -> int:
    """Run one `dinofeat features` process per image at once, each as its own user (the image's stem's
    number); return the server's peak RSS meanwhile."""
    peak, sampling = [server.rss_bytes()], threading.Event()

    def sample_memory() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], server.rss_bytes())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    try:
        clients = [subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "features", "--server", server.address,
                                     str(image), "-o", str(image.with_suffix(".h5")), "--quiet"],
                                    env={**os.environ, "DINOFEAT_TOKEN": f"token-of-user{image.stem[1:]}-for-tests"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for image in images]
        errors = [client.communicate(timeout=600)[1] for client in clients]
    finally:
        sampling.set()
        sampler.join()
    assert [client.returncode for client in clients] == [0] * len(images), errors
    return peak[0]


def test_sixteen_concurrent_clients_get_correct_features_and_server_memory_stays_bounded(lab_server, tmp_path):
    server = lab_server
    images = {tmp_path / f"c{number}.tif": noise(number, 384) for number in range(17)}
    for path, image in images.items():
        write_tiff(path, image)
    paths = list(images)
    baseline = server.rss_bytes()
    one_client = fetch_in_processes(server, paths[16:]) - baseline
    sixteen_clients = fetch_in_processes(server, paths[:16]) - baseline
    for path, image in images.items():
        with h5py.File(path.with_suffix(".h5"), "r") as f:
            np.testing.assert_allclose(f["features"][()], FEATURE_SETS[DEFAULT_SET].compute(intensity_scaled(image)), rtol=1e-5, atol=1e-6)
    # two workers compute at once, whatever the number of clients: memory follows the workers, not the clients
    assert sixteen_clients < 3 * one_client + (64 << 20), f"RSS grew {one_client / 1e6:.0f} MB for one, {sixteen_clients / 1e6:.0f} MB for 16"
    with FeatureClient(server.address, token="token-of-user0-for-tests") as client:
        status = client.status()
    assert (status.finished, status.running, status.queued, status.cancelled) == (17, 0, 0, 0)
    assert {row.client: row.finished for row in status.clients} == {user: 1 for user in USERS}


def test_a_small_request_is_not_stuck_behind_ten_large_ones(tmp_path, monkeypatch):
    """The heavy user is one process with ten requests on its connection; the light user is another
    process on the same host, told apart by its token."""
    write_tiff(tmp_path / "light.tif", noise(7, 64))
    server = ServerProcess("--workers", "1", "--max-streams-per-client", "16", "--token-file", str(token_file(tmp_path, ["heavy", "light"])))
    monkeypatch.setenv("DINOFEAT_TOKEN", "token-of-light-for-tests")
    try:
        heavy_done = []
        with FeatureClient(server.address, token="token-of-heavy-for-tests") as heavy, ThreadPoolExecutor(10) as pool:
            def fetch_heavy(number: int) -> None:
                heavy.fetch_features(noise(100 + number, 768), tmp_path / f"heavy{number}.h5")
                heavy_done.append(number)

            futures = [pool.submit(fetch_heavy, n) for n in range(10)]
            wait_for(lambda: heavy.status().queued >= 5, what="five heavy requests waiting")
            done_before = len(heavy_done)
            light = dinofeat("features", "--server", server.address, str(tmp_path / "light.tif"), "-o", str(tmp_path / "light.h5"))
            done_after = len(heavy_done)
            for future in futures:
                future.result()
        assert light.returncode == 0, light.stderr
        # one heavy request was running when the light one arrived; the light one went next
        assert done_after - done_before <= 1 and len(heavy_done) == 10
    finally:
        server.stop()


def test_a_full_queue_refuses_new_requests_with_resource_exhausted(tmp_path):
    server = ServerProcess("--workers", "1", "--queue-length", "1")
    try:
        with FeatureClient(server.address) as first, FeatureClient(server.address) as second, \
                FeatureClient(server.address) as third, ThreadPoolExecutor(2) as pool:
            running = pool.submit(first.fetch_features, noise(1, 1536), tmp_path / "first.h5")
            wait_for(lambda: first.status().running == 1, what="the first request running")
            waiting = pool.submit(second.fetch_features, noise(2, 512), tmp_path / "second.h5")
            wait_for(lambda: first.status().queued == 1, what="the second request waiting")
            with pytest.raises(DinofeatError, match=r"queue is full \(1 requests waiting\)"):
                third.fetch_features(noise(3, 512), tmp_path / "third.h5")
            running.result()
            waiting.result()
            assert third.status().refused == 1
        assert not (tmp_path / "third.h5").exists()
    finally:
        server.stop()


def test_a_request_longer_than_the_servers_limit_ends_with_deadline_exceeded(tmp_path):
    server = ServerProcess("--max-request-seconds", "0.5")
    try:
        with FeatureClient(server.address) as client:
            started = time.monotonic()
            with pytest.raises(DinofeatError, match="ran out of time after 0 s"):
                client.fetch_features(noise(4, 2048), tmp_path / "slow.h5")
            assert time.monotonic() - started < 5
            client.fetch_features(noise(5, 64), tmp_path / "quick.h5")  # still serving
        assert not (tmp_path / "slow.h5").exists()
        assert '"outcome": "deadline_exceeded"' in server.log
    finally:
        server.stop()


def test_a_killed_client_stops_its_work_and_the_server_serves_others(server, tmp_path):
    write_tiff(tmp_path / "big.tif", noise(6, 4096))
    client = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "features", "--server", server.address,
                               str(tmp_path / "big.tif"), "-o", str(tmp_path / "big.h5"), "--quiet"])
    with FeatureClient(server.address) as other:
        wait_for(lambda: other.status().running == 1, what="the big request running")
        client.send_signal(signal.SIGKILL)
        client.wait()
        killed = time.monotonic()
        wait_for(lambda: other.status().cancelled == 1 and other.status().running == 0, seconds=20, what="the work stopping")
        stopped_after = time.monotonic() - killed
        other.fetch_features(noise(8, 128), tmp_path / "other.h5")
    assert stopped_after < 10  # the whole 4096x4096 stack takes far longer on these machines
    assert not (tmp_path / "big.h5").exists()
    assert '"outcome": "cancelled"' in server.log


def test_a_server_killed_mid_stream_leaves_no_file_and_the_client_resumes_after_a_restart(tmp_path):
    image = noise(9, 1536)
    write_tiff(tmp_path / "image.tif", image)
    output, partial = tmp_path / "features.h5", tmp_path / "features.h5.partial"
    first = ServerProcess()
    client = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "features", "--server", first.address,
                               str(tmp_path / "image.tif"), "-o", str(output), "--quiet", "--retries", "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 20 << 20, what="20 MB of the stream arriving")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        time.sleep(0.5)
        assert not output.exists()
        second = ServerProcess(port=first.port)
        out, err = client.communicate(timeout=300)
        second.stop()
    finally:
        client.kill()
        first.stop()
    assert client.returncode == 0, err
    assert "unavailable; trying again" in err and "resumed" in out
    assert not partial.exists()
    reference = ServerProcess()
    try:
        with FeatureClient(reference.address) as fresh:
            fresh.fetch_features(image, tmp_path / "reference.h5")
    finally:
        reference.stop()
    assert stored_chunks(output) == stored_chunks(tmp_path / "reference.h5")
    with h5py.File(output, "r") as resumed, h5py.File(tmp_path / "reference.h5", "r") as uninterrupted:
        assert dict(resumed["features"].attrs).keys() == dict(uninterrupted["features"].attrs).keys()
        for key, value in uninterrupted["features"].attrs.items():
            np.testing.assert_array_equal(resumed["features"].attrs[key], value)


def test_a_client_gives_up_after_its_retries_with_one_sentence(tmp_path):
    write_tiff(tmp_path / "image.tif", noise(10, 64))
    server = ServerProcess()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    result = dinofeat("features", "--server", server.address, str(tmp_path / "image.tif"), "-o", str(tmp_path / "f.h5"),
                      "--retries", "1")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("or leave out --server to use an embedded one.")
    assert "Traceback" not in result.stderr


def test_the_status_command_shows_queue_and_workers(server):
    result = dinofeat("status", "--server", server.address)
    assert result.returncode == 0, result.stderr
    assert "0 running on 2 workers, 0 waiting (queue 64)" in result.stdout


def test_each_streaming_call_leaves_one_json_log_line_without_secrets(server, tmp_path):
    with FeatureClient(server.address) as client:
        client.fetch_features(noise(11, 64), tmp_path / "f.h5")
    wait_for(lambda: '"method": "feature_stream"' in server.log, seconds=10, what="the log line")
    line = next(line for line in server.log.splitlines() if '"method": "feature_stream"' in line)
    record = json.loads(line[line.index("{"):])
    assert record["outcome"] == "ok" and record["bytes"] > 0 and record["client"] == "127.0.0.1"  # the IP address, not the connection


def test_a_config_file_sets_the_limits_and_flags_override_it(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('[server]\ncache_gb = 0\n\n[limits]\nworkers = 3\nqueue_length = 5\nmax_pixels = 10000\n')
    server = ServerProcess("--config", str(config), "--queue-length", "7")
    try:
        with FeatureClient(server.address) as client:
            status = client.status()
            assert (status.workers, status.queue_length) == (3, 7)  # the flag overrides the file
            with pytest.raises(DinofeatError, match="more than this server's limit of 10000"):
                client.fetch_features(noise(12, 128), tmp_path / "f.h5")
    finally:
        server.stop()


def test_sigterm_stops_the_server_within_its_grace_period_and_leaves_no_output(tmp_path):
    write_tiff(tmp_path / "big.tif", noise(13, 4096))
    server = ServerProcess()
    client = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "features", "--server", server.address,
                               str(tmp_path / "big.tif"), "-o", str(tmp_path / "big.h5"), "--quiet", "--retries", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with FeatureClient(server.address) as watcher:
            wait_for(lambda: watcher.status().running == 1, what="the big request running")
        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        stopped_after = time.monotonic() - stopping
        _, err = client.communicate(timeout=60)
    finally:
        client.kill()
        server.stop()
    assert server.process.returncode == 0 and stopped_after < 10  # 5 s of grace for running streams, then abort
    assert client.returncode == 1 and err.strip().startswith("dinofeat: error: ") and "Traceback" not in err
    assert not (tmp_path / "big.h5").exists()
