"""A device pool in one server: `--devices`, workers per device, borrowing idle workers for the tiles (or the
slices) of one large request, and per-device status. Real `dinofeat serve` processes on loopback with the tiny ViT, on CPU
workers (the same code drives GPUs)."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ServerProcess, dinofeat, free_port, noise, wait_for
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.service.config import ServerLimits, serve_settings
from dinofeat_server.service.device_pool import pick_devices

SIZE = 300
"""A 300 x 300 image plans 4 tiles of the tiny ViT within the smallest tile budget (memory_gb 1)."""


class PoolServer(ServerProcess):
    """`dinofeat serve --devices DEVICES` (ServerProcess always passes --device, which a pool replaces)."""

    def __init__(self, devices: str, *extra: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = ""
        self.process = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(self.port),
                                         "--devices", devices, "--cache-gb", "0", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_until_listening()


@pytest.fixture(scope="module")
def servers(tiny_weights):
    """(a pool of two one-thread CPU workers, a server of one such worker), same tile budget, tiny ViT."""
    common = ("--threads", "1", "--memory-gb", "1", "--weights", f"dinov2_vits14={tiny_weights}")
    pool, single = PoolServer("cpu", "--workers", "2", *common), ServerProcess("--workers", "1", *common)
    yield pool, single
    pool.stop()
    single.stop()


def features(address: str, image: np.ndarray, path: Path) -> np.ndarray:
    """The dinov2 features (preset fast) of `image` from the server at `address`."""
    with FeatureClient(address) as client:
        client.fetch_features(image, path, "dinov2", preset="fast")
    with h5py.File(path) as file:
        return file["features"][:]


def cpu_row(address: str):
    with FeatureClient(address) as client:
        return next(row for row in client.status().devices if row.device == "cpu")


def test_two_concurrent_requests_run_at_once_on_a_two_worker_pool_and_equal_one_workers_results(servers, tmp_path):
    pool, single = servers
    images = [noise(seed, SIZE) for seed in (1, 2)]
    seen, done = [], threading.Event()

    def watch() -> None:
        with FeatureClient(pool.address) as client:
            while not done.wait(0.02):
                seen.append(client.status().running)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as clients:
            pooled = list(clients.map(lambda n: features(pool.address, images[n], tmp_path / f"pool{n}.h5"), range(2)))
    finally:
        done.set()
        watcher.join()
    assert max(seen) == 2, "both requests were never computing at the same time"
    for n, image in enumerate(images):
        np.testing.assert_allclose(pooled[n], features(single.address, image, tmp_path / f"one{n}.h5"), atol=1e-5)


def test_one_large_request_borrows_the_idle_worker_for_its_tiles_and_equals_one_workers_result(servers, tmp_path):
    pool, single = servers
    image = noise(3, SIZE)
    before = cpu_row(pool.address)
    pooled = features(pool.address, image, tmp_path / "pool.h5")
    after = cpu_row(pool.address)
    assert after.tiles - before.tiles == 4  # the whole plan, each tile once
    assert after.lent_tiles - before.lent_tiles >= 1  # some computed by the second worker
    assert after.workers == 2
    wait_for(lambda: cpu_row(pool.address).busy == 0, seconds=10, what="both workers free again")
    np.testing.assert_allclose(pooled, features(single.address, image, tmp_path / "one.h5"), atol=1e-5)


def test_the_slices_of_a_volume_go_to_both_workers_and_equal_one_workers_result(servers, tmp_path):
    pool, single = servers
    volume = np.stack([noise(seed, 112) for seed in range(10, 16)])
    before = cpu_row(pool.address)
    pooled = features(pool.address, volume, tmp_path / "pool.h5")
    after = cpu_row(pool.address)
    assert after.tiles - before.tiles == 6 and after.lent_tiles - before.lent_tiles >= 1  # one tile a slice, some lent
    np.testing.assert_allclose(pooled, features(single.address, volume, tmp_path / "one.h5"), atol=1e-5)


def test_status_shows_one_row_per_device_with_its_workers_tiles_and_models(servers, tmp_path):
    pool, _ = servers
    features(pool.address, noise(4, 100), tmp_path / "small.h5")  # one tile at least, whatever ran before
    result = dinofeat("status", "--server", pool.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["device", "workers"])
    row = lines[lines.index(header) + 1].split()
    assert row[:2] == ["cpu", "2"] and int(row[3]) >= 1 and row[-1] == "dinov2_vits14"  # device, workers, busy, tiles, ...
    assert "(devices cpu" not in pool.log and "(device cpu; 2 workers x 1 thread, queue 64)" in pool.log


def test_devices_name_every_gpu_or_the_cpu_and_bad_names_get_one_sentence():
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert pick_devices("all") == ([torch.device("cuda", i) for i in range(gpus)] or [torch.device("cpu")])
    assert pick_devices("cpu") == [torch.device("cpu")]
    for text, sentence in [("cpu,cpu", "--devices lists cpu twice; list each device once and set its workers with --workers."),
                           ("tpu", "unknown device 'tpu' in --devices; give all (every CUDA GPU, else the CPU), cpu, or CUDA GPUs"),
                           ("cpu,", "--devices 'cpu,' lists an empty name;")]:
        with pytest.raises(DinofeatError) as refused:
            pick_devices(text)
        assert str(refused.value).startswith(sentence) and str(refused.value).count(". ") == 0


def test_workers_count_per_device_and_threads_share_the_cores_between_all_workers(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    limits = ServerLimits(workers=2, memory_gb=5)
    assert [limits.threads_per_worker(devices) for devices in (1, 2, 4)] == [8, 4, 2]
    assert limits.threads_per_worker(1) == 8  # one device: as before the pool
    assert limits.tile_budget(2) == limits.tile_budget(1) // 2


def test_a_devices_flag_replaces_the_files_device_and_both_flags_are_refused(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[server]\ndevice = "cpu"\n')
    settings, _ = serve_settings(path, {"devices": "all", "device": None}, {})
    assert settings["devices"] == "all" and "device" not in settings
    with pytest.raises(DinofeatError, match=r"^give --device \(one device\) or --devices \(a pool of them\), not both\.$"):
        serve_settings(None, {"devices": "cpu", "device": "cpu"}, {})
    path.write_text('[server]\ndevice = "cpu"\ndevices = "all"\n')
    with pytest.raises(DinofeatError, match="has both device and devices; keep device for one device or devices for a pool"):
        serve_settings(path, {}, {})


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_serve_refuses_a_gpu_it_lacks_and_both_device_flags_in_one_sentence():
    for args, sentence in [(["--devices", "cuda:7"], "device 'cuda:7' "),
                           (["--device", "cpu", "--devices", "cpu"], "give --device (one device) or --devices (a pool of them), not both.")]:
        result = dinofeat("serve", "--port", str(free_port()), *args, timeout=120)
        assert result.returncode != 0
        assert result.stderr.startswith(f"dinofeat: error: {sentence}") and len(result.stderr.strip().splitlines()) == 1, result.stderr
