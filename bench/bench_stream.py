"""Stream throughput over loopback: a precomputed feature stack through the real wire (chunk encoding,
the servicer's stream, the client writing an HDF5 file with write_direct_chunk), raw and gzip-1,
against a raw gRPC byte stream of the same size from the same server in the same run.

The server is the real FeatureServicer (its scheduler, worker thread and `_stream`) whose
ComputeFeatures streams a stack computed once up front, so the figure measures the wire and the file
writing, not the filters. The raw stream sends the stack's bytes in messages as large as ours and the
client only counts them: the most gRPC carries here. Client and server are separate processes (they do
not share a GIL), alternating over the repeats; the best run of each counts (the machine is shared).
Target: >= 500 MB/s raw.
Usage: python bench/bench_stream.py [--size 1024] [--channels 58] [--repeats 3] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat.contract.chunk_batches import BATCH_BYTES
from dinofeat_client.client import FeatureClient
from dinofeat_client.dataset_file import DatasetFile
from dinofeat.contract.wire import feature_layout
from dinofeat_server.service.device_pool import DevicePool
from dinofeat_server.service.server import SERVER_OPTIONS
from dinofeat_server.service.checks import checked_encoding
from dinofeat_server.service.servicer import FeatureServicer
from dinofeat_server.service.streaming import dataset_messages
from machine import parse_args, save

RESULT_KEY = "bench-stream"
"""The result key of the precomputed stack (the client's DatasetFile expects it)."""
RAW_METHOD = "/bench.RawBytes/Stream"
"""A server-streaming method of bytes messages, beside the FeatureService on the same server."""


class PrecomputedServicer(FeatureServicer):
    """Streams one fixed stack for every ComputeFeatures request, through the servicer's own `_stream`."""

    def __init__(self, stack: np.ndarray):
        super().__init__(DevicePool.on_cpu(1))
        self.stack = stack

    async def ComputeFeatures(self, request, context):
        encoding = checked_encoding(request.encoding)
        layout = feature_layout("features", self.stack.shape, encoding.compression, encoding.level)
        rows = layout.chunk_shape[-2]

        def work(models, device, cancelled):
            blocks = (((0, y, 0), self.stack[:, y : y + rows]) for y in range(0, self.stack.shape[1], rows))
            return dataset_messages(layout, {"channel_names": [f"c{i}" for i in range(len(self.stack))]}, RESULT_KEY, blocks,
                                    cancelled, "features")

        await self._stream(work, context)


def raw_handler(stack: np.ndarray) -> grpc.GenericRpcHandler:
    """RAW_METHOD: the stack's bytes in BATCH_BYTES messages, nothing else."""
    data = memoryview(stack.tobytes())

    async def stream(request: bytes, context):
        for start in range(0, len(data), BATCH_BYTES):
            await context.write(bytes(data[start : start + BATCH_BYTES]))

    service, method = RAW_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_stream_rpc_method_handler(stream)})


def serve_precomputed(stack: np.ndarray, port_queue) -> None:
    """Server process: the real servicer (streaming `stack` for every request) and the raw byte stream."""

    async def run():
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_FeatureServiceServicer_to_server(PrecomputedServicer(stack), server)
        server.add_generic_rpc_handlers((raw_handler(stack),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def start(stack: np.ndarray) -> tuple[str, multiprocessing.Process]:
    """The server in its own process, as in real use (forked before this process opens any channel)."""
    context = multiprocessing.get_context("fork")
    ports = context.Queue()
    process = context.Process(target=serve_precomputed, args=(stack, ports), daemon=True)
    process.start()
    return f"127.0.0.1:{ports.get(timeout=60)}", process


def raw_seconds(address: str) -> tuple[float, int]:
    """(seconds, bytes) of one raw byte stream, received and counted."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(RAW_METHOD)
        started, received = time.perf_counter(), 0
        for message in call(b""):
            received += len(message)
        return time.perf_counter() - started, received


def feature_seconds(client: FeatureClient, path: Path, compression: str) -> tuple[float, int]:
    """(seconds, bytes on the wire) of one feature stream received by the client into the HDF5 file `path`."""
    path.unlink(missing_ok=True)
    request = pb.ComputeFeaturesRequest(encoding=pb.Encoding(compression=compression, level=1))
    started = time.perf_counter()
    transfer = client.receive(client.stub.ComputeFeatures(request), DatasetFile(path, RESULT_KEY), False, None)
    return time.perf_counter() - started, transfer.bytes_received


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=58)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, quick={"size": 512, "repeats": 2})
    rng = np.random.default_rng(0)
    # smooth, feature-like data (pure noise would not compress like real features do)
    stack = np.cumsum(rng.normal(size=(args.channels, args.size, args.size)).astype(np.float32), axis=2) / 50
    address, server = start(stack)
    raw_mb = stack.nbytes / 1e6
    runs: dict[str, list[float]] = {"grpc_bytes": [], "none": [], "gzip": []}
    wire: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder, FeatureClient(address) as client:
        for _ in range(args.repeats):
            seconds, wire["grpc_bytes"] = raw_seconds(address)
            runs["grpc_bytes"].append(seconds)
            for compression in ("none", "gzip"):
                seconds, wire[compression] = feature_seconds(client, Path(folder) / f"{compression}.h5", compression)
                runs[compression].append(seconds)
    server.terminate()
    results = {"stack": list(stack.shape), "raw_MB": raw_mb, "message_bytes": BATCH_BYTES, "repeats": args.repeats}
    for name, seconds in runs.items():
        results[name] = {"seconds": seconds, "raw_MB_per_s": raw_mb / min(seconds),
                         "median_raw_MB_per_s": raw_mb / statistics.median(seconds), "wire_MB": wire[name] / 1e6}
        print(f"{name:>10}: best {min(seconds):.2f} s, {raw_mb / min(seconds):.0f} MB/s of float32 features "
              f"(median {raw_mb / statistics.median(seconds):.0f}), {wire[name] / 1e6:.0f} MB on the wire")
    for name in ("none", "gzip"):
        results[name]["of_grpc_bytes"] = results[name]["raw_MB_per_s"] / results["grpc_bytes"]["raw_MB_per_s"]
    print(f"raw stream at {results['none']['of_grpc_bytes']:.0%} of gRPC's own byte stream, "
          f"gzip-1 at {results['gzip']['of_grpc_bytes']:.0%}")
    save("stream", results)


if __name__ == "__main__":
    main()
