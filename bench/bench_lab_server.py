"""A shared server under load: requests per second and p50/p95 latency for 1, 4 and 16 concurrent
clients, each a separate process with its own connection, asking for the classical set of its own
512x512 images (no two alike, result cache off) from a real `dinofeat serve` on loopback.

Stream throughput with and without compression is bench_stream.py's figure.
One server per worker count in --workers (a worker computes one request at a time with cores / workers
threads by default), so one worker with all the threads and several with fewer are compared in one run.
Usage: python bench/bench_lab_server.py [--size 512] [--requests 32] [--workers 1 2] [--clients 1 4 16]
       [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import parse_args, save


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts, one server each")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrency levels")
    args = parse_args(parser, quick={"requests": 4, "clients": [1, 4]})
    results = {"size": args.size, "feature_set": "classical", "servers": []}
    for workers in args.workers:
        results["servers"].append(server_figures(workers, args))
    save("lab_server", results)


if __name__ == "__main__":
    main()
