"""Fair by work, not by count: small requests' latency beside large ones, and the delay a client that stops
reading causes others, on a real `dinofeat serve` (default two workers on this machine's cores, cache off).

Load: 3 clients ask for the classical features of large images (--large, one after another), 13 others for
small ones (64 to 256 px, drawn at random), each pausing --think seconds between requests as a person at a
viewer does; every client is its own process with its own connection. Figures: the small requests' median
and p99 latency (targets: under 1 s and 3 s), and the large requests done.
Stall: two clients start a large request each and read nothing (both workers held); another client then
asks for a small (128 px) and a medium (512 px, beyond the small size) request. Figures: their latencies
(target: under 5 s; the server's stall_seconds is 60).
Usage: python bench/bench_fairness.py [--seconds 60] [--large 1536] [--think 0.5] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_lab_server import free_port, wait_until_listening
from machine import parse_args, save

SMALL_SIZES = (64, 128, 192, 256)
SMALL_CLIENTS = 13
LARGE_CLIENTS = 3


def token(number: int) -> str:
    """Client `number`'s token: every client is a user of its own (without tokens, all are 127.0.0.1)."""
    return f"token-of-bench-user-{number:02d}"


def image(seed: int, size: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)


def client_loop(address: str, number: int, large: int, think: float, until: float, folder: str) -> list[tuple[int, float]]:
    """One client process: requests until `until` (time.time()); (size, latency in s) of each."""
    from dinofeat_client.client import FeatureClient

    rng = np.random.default_rng(number)
    done = []
    with FeatureClient(address, token=token(number)) as client:
        request = 0
        while time.time() < until:
            size = large if number < LARGE_CLIENTS else int(rng.choice(SMALL_SIZES))
            path = Path(folder) / f"{number}-{request}.h5"
            started = time.perf_counter()
            client.fetch_features(image(number * 100_000 + request, size), path, "classical")
            done.append((size, time.perf_counter() - started))
            path.unlink()
            request += 1
            if number >= LARGE_CLIENTS:
                time.sleep(think)
    return done


def serve(folder: Path) -> tuple[str, subprocess.Popen]:
    """`dinofeat serve` with its defaults (cache off), a token per client."""
    tokens = folder / "tokens.txt"
    tokens.write_text("".join(f"user{n} {token(n)}\n" for n in range(LARGE_CLIENTS + SMALL_CLIENTS + 3)))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(port), "--cache-gb", "0",
                               "--token-file", str(tokens)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_listening(port, server)
    return f"127.0.0.1:{port}", server


def load_figures(address: str, args: argparse.Namespace) -> dict:
    """Small requests' latency while large ones run."""
    until = time.time() + args.seconds
    with tempfile.TemporaryDirectory() as folder, multiprocessing.get_context("fork").Pool(LARGE_CLIENTS + SMALL_CLIENTS) as pool:
        runs = pool.starmap(client_loop, [(address, n, args.large, args.think, until, folder)
                                          for n in range(LARGE_CLIENTS + SMALL_CLIENTS)])
    small = np.array([seconds for run in runs[LARGE_CLIENTS:] for _, seconds in run])
    large = [seconds for run in runs[:LARGE_CLIENTS] for _, seconds in run]
    figures = {"seconds": args.seconds, "large_size": args.large, "think_s": args.think, "small_requests": int(small.size),
               "small_median_s": float(np.median(small)), "small_p99_s": float(np.percentile(small, 99)),
               "small_max_s": float(small.max()), "large_requests": len(large),
               "large_median_s": float(np.median(large)) if large else None}
    print(f"load: {small.size} small requests, median {figures['small_median_s']:.2f} s, p99 {figures['small_p99_s']:.2f} s "
          f"(targets 1 s and 3 s), max {figures['small_max_s']:.2f} s; {len(large)} large ({args.large} px) requests done")
    return figures


def stall_figures(address: str, args: argparse.Namespace) -> dict:
    """Another client's small and medium requests while two clients hold both workers and read nothing."""
    import grpc
    from dinofeat.v1 import feature_service_pb2 as pb
    from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
    from dinofeat_client.client import FeatureClient

    figures = {}
    stalled = LARGE_CLIENTS + SMALL_CLIENTS
    with tempfile.TemporaryDirectory() as folder, FeatureClient(address, token=token(stalled + 2)) as client:
        channels, calls = [], []
        for number in range(stalled, stalled + 2):
            sha = client.upload(image(900 + number, args.large))
            channel = grpc.insecure_channel(address)
            channels.append(channel)
            calls.append(pb_grpc.FeatureServiceStub(channel).ComputeFeatures(
                pb.ComputeFeaturesRequest(image_sha256=sha, feature_set="classical"),
                metadata=[("authorization", f"Bearer {token(number)}")]))
        deadline = time.monotonic() + 60
        while client.status().running < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # both stalled streams have filled their connections' buffers
        for name, size in (("small", 128), ("medium", 512)):
            started = time.perf_counter()
            client.fetch_features(image(950, size), Path(folder) / f"{name}.h5", "classical")
            figures[f"{name}_s"] = time.perf_counter() - started
        for call, channel in zip(calls, channels):
            call.cancel()
            channel.close()
    print(f"stall: with two readers stalled on both workers, another client's 128 px request took {figures['small_s']:.2f} s, "
          f"its 512 px request {figures['medium_s']:.2f} s (target 5 s; stall_seconds 60)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60, help="length of the load run")
    parser.add_argument("--large", type=int, default=1536, help="edge of the large clients' images")
    parser.add_argument("--think", type=float, default=0.5, help="pause of a small client between its requests, in s")
    args = parse_args(parser, quick={"seconds": 20, "large": 1024})
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        address, server = serve(Path(folder))
        try:
            results["stall"] = stall_figures(address, args)
            results["load"] = load_figures(address, args)
        finally:
            server.terminate()
            server.wait()
    save("fairness", results)


if __name__ == "__main__":
    main()
