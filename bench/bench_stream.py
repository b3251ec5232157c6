"""Stream throughput over loopback: a precomputed feature stack served through the real wire
(chunk encoding, gRPC stream, client writing with write_direct_chunk), uncompressed and gzip-1.

The server is the real FeatureServicer with ComputeFeatures serving a stack computed once up front,
so the figure measures the wire and the file writing, not the filters. Target: >= 500 MB/s raw.
Usage: python bench/bench_stream.py [--size 1024] [--channels 58] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import torch
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat_client.client import FeatureClient
from dinofeat_client.wire import feature_layout, features_result_key, options_key
from dinofeat_server.service.servicer import FeatureServicer, checked_encoding
from dinofeat_server.service.streaming import dataset_messages
from machine import parse_args, save


class PrecomputedServicer(FeatureServicer):
    """Streams one fixed stack for every ComputeFeatures request."""

    def __init__(self, stack: np.ndarray):
        super().__init__(torch.device("cpu"))
        self.stack = stack

    async def ComputeFeatures(self, request, context):
        encoding = checked_encoding(request.encoding)
        layout = feature_layout("features", self.stack.shape, encoding.compression, encoding.level)
        chosen = request.options
        key = features_result_key(request.image_sha256, request.feature_set,
                                  options_key(chosen.backbone, chosen.preset, chosen.pca, chosen.normalise), layout.compression, layout.level)
        rows = layout.chunk_shape[-2]
        blocks = (((0, y, 0), self.stack[:, y : y + rows]) for y in range(0, self.stack.shape[1], rows))
        work = partial(dataset_messages, layout, {"channel_names": [f"c{i}" for i in range(len(self.stack))]}, key, blocks,
                       stage="features")
        await self._stream(lambda cancelled: work(cancelled), context)


def serve_precomputed(stack: np.ndarray, port_queue) -> None:
    """Server process: the real servicer, streaming `stack` for every request."""

    async def run():
        server = grpc.aio.server()
        pb_grpc.add_FeatureServiceServicer_to_server(PrecomputedServicer(stack), server)
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def start(stack: np.ndarray) -> tuple[str, multiprocessing.Process]:
    """The server in its own process, as in real use (client and server do not share a GIL)."""
    ports = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=serve_precomputed, args=(stack, ports), daemon=True)
    process.start()
    return f"127.0.0.1:{ports.get(timeout=60)}", process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=58)
    args = parse_args(parser, quick={"size": 512})
    rng = np.random.default_rng(0)
    # smooth, feature-like data (pure noise would not compress like real features do)
    base = np.cumsum(rng.normal(size=(args.channels, args.size, args.size)).astype(np.float32), axis=2) / 50
    image = rng.integers(0, 255, (args.size, args.size), dtype=np.uint8)
    address, server = start(base)
    raw_mb = base.nbytes / 1e6
    results = {"stack": list(base.shape), "raw_MB": raw_mb}
    with tempfile.TemporaryDirectory() as folder, FeatureClient(address) as client:
        client.upload(image)
        for compression in ("none", "gzip"):
            path = Path(folder) / f"{compression}.h5"
            start_time = time.perf_counter()
            transfer = client.fetch_features(image, path, compression=compression, level=1)
            seconds = time.perf_counter() - start_time
            results[compression] = {"seconds": seconds, "raw_MB_per_s": raw_mb / seconds,
                                    "wire_MB": transfer.bytes_received / 1e6, "file_MB": path.stat().st_size / 1e6}
            print(f"{compression:>5}: {seconds:.2f} s, {raw_mb / seconds:.0f} MB/s of float32 features, "
                  f"{transfer.bytes_received / 1e6:.0f} MB on the wire")
    server.terminate()
    save("stream", results)


if __name__ == "__main__":
    main()
