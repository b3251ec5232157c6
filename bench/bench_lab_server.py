"""A shared server under load: requests per second and p50/p95 latency for 1, 4 and 16 concurrent
clients, each a separate process with its own connection, asking for the classical set of its own
512x512 images (no two alike, result cache off) from a real `dinofeat serve` on loopback.

Stream throughput with and without compression is bench_stream.py's figure.
One server per worker count in --workers (a worker computes one request at a time with cores / workers
threads by default), so one worker with all the threads and several with fewer are compared in one run.

The device pool: one large request of dinov2 features (ViT-S with random weights: timing does not depend
on their values; preset fast, PCA to 16 channels) on `dinofeat serve --devices cpu` with 1 and 2 one-thread workers
(--pool-workers), each with the same tile budget, so the same tiles are computed; with two, the request
borrows the idle worker for its tiles (an image) or its slices (a volume). Figures: pixels/s, voxels/s
and tiles/s of each request (the feature space is taken from a warm-up request, so fitting is not
timed), and how many tiles the lent worker computed.
Usage: python bench/bench_lab_server.py [--size 512] [--requests 32] [--workers 1 2] [--clients 1 4 16]
       [--pool-size 1536] [--pool-slices 16] [--pool-workers 1 2] [--only load|pool] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import parse_args, save

POOL_PCA = 16
"""Channels of the pool's requests: with all 384, compressing and sending the stream on the request's own worker
(3.6 GB for a 1536 x 1536 image) took as long as the tiles, so the figure measured gzip, not the pool."""
POOL_TILE_GB = 0.25
"""Tile budget of each pool worker: the servers get memory_gb = 1 (their base) + workers x this."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(port: int, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait for `dinofeat serve` to listen on `port` (clients fail at once on a refused connection);
    one sentence if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench_lab_server: `dinofeat serve` exited with status {server.returncode} before listening; "
                     f"run `dinofeat {' '.join(map(str, server.args[3:]))}` by hand to see why.")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    server.terminate()
    sys.exit(f"bench_lab_server: `dinofeat serve` did not listen on port {port} within {timeout_s:.0f} s.")


def client_run(address: str, seeds: list[int], size: int, folder: str) -> list[float]:
    """One client process: fetch the features of one image per seed, one after another; latencies in s."""
    from dinofeat_client.client import FeatureClient

    latencies = []
    with FeatureClient(address) as client:
        for seed in seeds:
            image = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
            started = time.perf_counter()
            client.fetch_features(image, Path(folder) / f"{seed}.h5")
            latencies.append(time.perf_counter() - started)
            (Path(folder) / f"{seed}.h5").unlink()
    return latencies


def load(address: str, clients: int, requests: int, size: int, seed0: int) -> dict:
    per_client = max(1, requests // clients)
    seeds = [[seed0 + c * per_client + r for r in range(per_client)] for c in range(clients)]
    with tempfile.TemporaryDirectory() as folder, multiprocessing.get_context("spawn").Pool(clients) as pool:
        started = time.perf_counter()
        latencies = np.concatenate(pool.starmap(client_run, [(address, s, size, folder) for s in seeds]))
        seconds = time.perf_counter() - started
    return {"clients": clients, "requests": int(latencies.size), "seconds": seconds, "requests_per_s": latencies.size / seconds,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95))}


def server_figures(workers: int, args: argparse.Namespace) -> dict:
    """Throughput and latency of one `dinofeat serve --workers N` at every concurrency level."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(port), "--cache-gb", "0",
                               "--workers", str(workers), "--max-streams-per-client", "64"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        wait_until_listening(port, server)
        load(address, 1, 2, 64, 10**6)  # warm the server up
        figures = {"workers": workers, "levels": []}
        for clients in args.clients:
            level = load(address, clients, args.requests, args.size, clients * 1000)
            figures["levels"].append(level)
            print(f"{workers} worker(s), {clients:>2} clients: {level['requests_per_s']:.2f} requests/s, p50 {level['p50_s']:.2f} s, "
                  f"p95 {level['p95_s']:.2f} s ({level['requests']} requests of {args.size}x{args.size})")
    finally:
        server.terminate()
        server.wait()
    return figures


def random_vits14(folder: Path) -> Path:
    """A ViT-S/14 of the real architecture with random weights, saved in the official layout."""
    import torch
    from dinofeat_server.engine.backbone import DinoVisionTransformer
    from dinofeat_server.engine.weights import official_config

    torch.manual_seed(0)
    path = folder / "random_vits14.pth"
    torch.save(DinoVisionTransformer(official_config("dinov2_vits14")).state_dict(), path)
    return path


def pool_figures(workers: int, size: int, slices: int, weights: Path, folder: Path) -> dict:
    """Throughput of one size x size dinov2 request, and of one volume of `slices` 224 x 224 slices, on
    `dinofeat serve --devices cpu --workers N --threads 1`."""
    from dinofeat_client.client import FeatureClient
    from dinofeat_client.spaces import read_space

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(port), "--cache-gb", "0",
                               "--devices", "cpu", "--workers", str(workers), "--threads", "1",
                               "--memory-gb", str(1 + workers * POOL_TILE_GB), "--weights", f"dinov2_vits14={weights}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(0)
    try:
        wait_until_listening(port, server)
        with FeatureClient(f"127.0.0.1:{port}") as client:
            warm = folder / f"warm{workers}.h5"
            client.fetch_features((rng.random((224, 224)) * 255).astype(np.uint8), warm, "dinov2", preset="fast",
                                  pca=POOL_PCA)
            figures = {"workers": workers, "threads_per_worker": 1}
            for name, data in (("image", rng.random((size, size))), ("volume", rng.random((slices, 224, 224)))):
                before = client.status().devices[0]
                started = time.perf_counter()
                client.fetch_features((data * 255).astype(np.uint8), folder / f"{name}{workers}.h5",
                                      "dinov2", preset="fast", pca=POOL_PCA, like=read_space(warm))
                seconds = time.perf_counter() - started
                after = client.status().devices[0]
                tiles, lent = after.tiles - before.tiles, after.lent_tiles - before.lent_tiles
                figures[name] = {"shape": list(data.shape), "seconds": seconds, "tiles": tiles, "lent_tiles": lent,
                                 "voxels_per_s": data.size / seconds, "tiles_per_s": tiles / seconds}
                print(f"pool of {workers} one-thread CPU worker(s): one {name} {'x'.join(map(str, data.shape))} (dinov2, fast) in "
                      f"{seconds:.1f} s, {data.size / seconds:,.0f} voxels/s, {tiles / seconds:.2f} tiles/s "
                      f"({tiles} tiles, {lent} on the lent worker)")
    finally:
        server.terminate()
        server.wait()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts, one server each")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--pool-size", type=int, default=1536, help="edge of the one large request of the pool figures")
    parser.add_argument("--pool-slices", type=int, default=16, help="slices (224 x 224) of the volume of the pool figures")
    parser.add_argument("--pool-workers", nargs="+", type=int, default=[1, 2], help="one-thread CPU workers of the pool, a server each")
    parser.add_argument("--only", choices=["load", "pool"], help="run only the load figures or only the pool's")
    args = parse_args(parser, quick={"requests": 4, "clients": [1, 4], "pool_size": 768, "pool_slices": 8})
    results = {}
    if args.only != "pool":
        results.update({"size": args.size, "feature_set": "classical", "servers": []})
        for workers in args.workers:
            results["servers"].append(server_figures(workers, args))
    if args.only != "load":
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as folder:
            weights = random_vits14(Path(folder))
            pool = [pool_figures(workers, args.pool_size, args.pool_slices, weights, Path(folder)) for workers in args.pool_workers]
        results["pool"] = {"feature_set": "dinov2", "backbone": "dinov2_vits14 (random weights)", "preset": "fast", "pca": POOL_PCA,
                           "tile_budget_gb": POOL_TILE_GB, "load_average_before": load_before,
                           "load_average_after": os.getloadavg(), "servers": pool}
    save("lab_server", results)


if __name__ == "__main__":
    main()
