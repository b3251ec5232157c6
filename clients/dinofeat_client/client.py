"""The Python client: upload images, receive feature stacks and segmentations as HDF5 files.

    with FeatureClient("127.0.0.1:50051") as client:
        client.fetch_features(image, "features.h5", feature_set="classical")

Progress is reported through an optional callback `progress(stage, done, total)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import h5py
import numpy as np

from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc

from .dataset_file import DatasetFile
from .errors import DinofeatError
from .images import check_image, check_labels, check_output_path, image_axes, image_sha256, write_tiff
from .wire import (DEFAULT_BACKBONE, DEFAULT_LEVEL, DEFAULT_PRESET, MAX_MESSAGE_BYTES, DatasetLayout, features_result_key,
                   options_key, segment_result_key)

Progress = Callable[[str, int, int], None]
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Transfer:
    """What a streamed result cost: the file, chunks received now, chunks in the file, bytes received."""

    path: Path
    chunks_received: int
    chunk_count: int
    bytes_received: int


class FeatureClient:
    """A connection to one dinofeat server."""

    def __init__(self, address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise DinofeatError(f"cannot reach a dinofeat server at {address}; start one with `dinofeat serve`, "
                                "or leave out --server to use an embedded one.") from None
        self.stub = pb_grpc.FeatureServiceStub(self.channel)

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method, request):
        """A unary call whose failures become one clear sentence."""
        try:
            return method(request)
        except grpc.RpcError as error:
            raise rpc_error(error, self.address) from None

    def health(self) -> pb.HealthReply:
        return self.call(self.stub.Health, pb.HealthRequest())

    def feature_sets(self) -> list[pb.FeatureSetInfo]:
        return list(self.call(self.stub.ListFeatureSets, pb.ListFeatureSetsRequest()).feature_sets)

    def upload(self, image: np.ndarray) -> str:
        """Send an image unless the server holds it already; returns its sha256."""
        sha = image_sha256(image)
        if self.call(self.stub.HasImage, pb.HasImageRequest(sha256=sha)).present:
            return sha
        data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes()

        def pieces() -> Iterator[pb.UploadImageChunk]:
            layout = pb.ImageLayout(dtype=image.dtype.name, shape=image.shape, axes=image_axes(image))
            yield pb.UploadImageChunk(header=pb.UploadHeader(layout=layout, sha256=sha))
            for start in range(0, len(data), MAX_MESSAGE_BYTES):
                yield pb.UploadImageChunk(data=data[start : start + MAX_MESSAGE_BYTES])

        self.call(self.stub.UploadImage, pieces())
        return sha

    def fetch_features(self, image: np.ndarray, output: str | Path, feature_set: str = "classical",
                       compression: str = "gzip", level: int = DEFAULT_LEVEL, progress: Progress | None = None,
                       backbone: str = DEFAULT_BACKBONE, preset: str = DEFAULT_PRESET, pca: int = 0,
                       normalise: str = "none") -> Transfer:
        """Compute a feature stack on the server and write it to `output` (.h5), resuming a partial file.

        `backbone`, `preset`, `pca` and `normalise` choose the deep sets' model, views, PCA size and scaling."""
        image = check_image(image)
        output = check_output_path(output)
        sha = self.upload(image)
        options = pb.FeatureOptions(backbone=backbone, preset=preset, pca=pca, normalise=normalise)
        key = features_result_key(sha, feature_set, options_key(backbone, preset, pca, normalise), compression, level)
        target = DatasetFile(output, key)
        missing = target.resumable_indices()
        request = pb.ComputeFeaturesRequest(
            image_sha256=sha, feature_set=feature_set, encoding=pb.Encoding(compression=compression, level=level),
            options=options, resume=missing is not None, chunk_indices=missing or [])
        return self.receive(self.stub.ComputeFeatures(request), target, missing is not None, progress)

    def segment(self, image: np.ndarray, labels: np.ndarray, output: str | Path, feature_set: str = "classical",
                probabilities: str | Path | None = None, trees: int = 0, seed: int = 0,
                progress: Progress | None = None, backbone: str = DEFAULT_BACKBONE, preset: str = DEFAULT_PRESET,
                pca: int = 0, normalise: str = "none") -> tuple[Path, Path | None]:
        """Train a forest on `labels` and write the class map (TIFF, in the labels' values) to `output`.

        The per-class probabilities go to `probabilities` (.h5) when given.
        """
        image = check_image(image)
        labels = check_labels(labels, image)
        output = check_output_path(output)
        probabilities_path = check_output_path(probabilities) if probabilities else output.with_name(f".{output.name}.probabilities.h5")
        request = pb.SegmentRequest(image_sha256=self.upload(image), labels_sha256=self.upload(labels),
                                    feature_set=feature_set, trees=trees, seed=seed,
                                    options=pb.FeatureOptions(backbone=backbone, preset=preset, pca=pca, normalise=normalise))
        key = segment_result_key(request.image_sha256, request.labels_sha256, feature_set,
                                 options_key(backbone, preset, pca, normalise), trees, seed)
        transfer = self.receive(self.stub.Segment(request), DatasetFile(probabilities_path, key), False, progress)
        try:
            with h5py.File(transfer.path, "r") as f:
                class_map = class_map_from_probabilities(f["probabilities"], labels.dtype)
            write_tiff(output, class_map)
        finally:
            if not probabilities:
                transfer.path.unlink(missing_ok=True)
        return output, (transfer.path if probabilities else None)

    def receive(self, stream, target: DatasetFile, resume: bool, progress: Progress | None) -> Transfer:
        """Write a DatasetStream into `target`; on any failure keep the partial file for a resume."""
        received = nbytes = expected = 0
        try:
            for message in stream:
                kind = message.WhichOneof("message")
                if kind == "progress" and progress:
                    progress(message.progress.stage, message.progress.done, message.progress.total)
                elif kind == "header":
                    header = message.header
                    layout = DatasetLayout(header.name, header.dtype, tuple(header.shape), tuple(header.chunk_shape),
                                           header.encoding.compression, header.encoding.level)
                    if header.result_key != target.key:
                        raise DinofeatError("the server describes its result differently from this client; update dinofeat on both sides.")
                    target.open(layout, json.loads(header.attributes_json), resume)
                    expected = header.chunk_count
                elif kind == "chunk":
                    chunk = message.chunk
                    target.write_chunk(tuple(chunk.offset), chunk.data, chunk.filter_mask)
                    received += 1
                    nbytes += len(chunk.data)
                    if progress:
                        progress("receiving", received, expected)
                elif kind == "trailer":
                    path = target.finish(message.trailer.chunk_count, message.trailer.sha256)
                    return Transfer(path, received, message.trailer.chunk_count, nbytes)
        except grpc.RpcError as error:
            raise rpc_error(error, self.address) from None
        finally:
            if target.file is not None:
                target.flush()
                target.close()
            stream.cancel()
        raise DinofeatError("the server ended the stream early; run the same command again to resume.")


def class_map_from_probabilities(probabilities: h5py.Dataset, dtype: np.dtype) -> np.ndarray:
    """Most probable class per pixel, in the user's label values, read slice by slice."""
    values = np.asarray(probabilities.attrs["class_values"]).astype(dtype)
    if probabilities.ndim == 3:
        return values[np.argmax(probabilities[()], axis=0)]
    return np.stack([values[np.argmax(probabilities[:, z], axis=0)] for z in range(probabilities.shape[1])])


def rpc_error(error: grpc.RpcError, address: str) -> DinofeatError:
    """One sentence for a failed call: the server's own message for bad input, else what happened."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return DinofeatError(f"lost the connection to the dinofeat server at {address}; run the same command again to resume.")
    if code == grpc.StatusCode.CANCELLED:
        return DinofeatError("the request was cancelled before it finished; run the same command again to resume.")
    return DinofeatError(error.details() or f"the server failed with {code.name}.")
