"""The Python client: upload images, receive feature stacks and segmentations as HDF5 files.

    with FeatureClient("127.0.0.1:50051") as client:
        client.fetch_features(image, "features.h5", "multiscale")

Progress is reported through an optional callback `progress(stage, done, total)`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read once, when grpc loads: its core's INFO lines (each failed
# TLS handshake) would otherwise print around the one sentence a failed connection gets
import grpc  # noqa: E402
import h5py
import numpy as np
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc

from dinofeat.contract.chunk_batches import AskForChunkBatches, chunks_of, keep_freed_memory
from dinofeat.contract.computation import DEEP_DEFAULT_SET, DEFAULT_SET, FeatureComputation
from dinofeat.contract.errors import DinofeatError, ServerUnavailable
from dinofeat.contract.images import check_image, check_labels, image_axes, image_sha256, without_singleton_axes
from dinofeat.contract.outputs import atomic_write, output_file, remove_quietly
from dinofeat.contract.tokens import read_credential
from dinofeat.contract.wire import (
    DEFAULT_CLASSIFIER,
    DEFAULT_GRID,
    DEFAULT_LEVEL,
    DEFAULT_TREES,
    DEFAULT_WINDOW,
    MAX_MESSAGE_BYTES,
    DatasetLayout,
    apply_result_key,
    features_result_key,
    result_key,
    segment_result_key,
    space_key,
)

from .connection import FIRST_BACKOFF_S, LONGEST_BACKOFF_S, host_and_port, wait_until_connected
from .dataset_file import DatasetFile
from .image_files import write_tiff

Progress = Callable[[str, int, int], None]
CONNECT_TIMEOUT_S = 10.0
RETRIES = 5
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
"""Reconnect quickly to a restarted server; the client's own retries pace the attempts."""


def channel_options(address: str) -> list[tuple[str, int]]:
    """CHANNEL_OPTIONS, with http_proxy/grpc_proxy off for a server on this machine (loopback or a Unix
    socket): a proxy must never carry its calls, or the token meant for it."""
    return CHANNEL_OPTIONS + ([("grpc.enable_http_proxy", 0)] if plaintext_token_refusal(address) is None else [])


def retried(method):
    """Run a client operation again, after a growing pause, when the server was unavailable.

    A feature stream starts again where it broke (its partial file keeps what arrived); nested
    operations (an upload inside a fetch) are retried only by the outermost one."""
    @functools.wraps(method)
    def run(self: FeatureClient, *args, **kwargs):
        if getattr(self._retrying, "active", False):
            return method(self, *args, **kwargs)
        self._retrying.active = True
        try:
            for attempt in itertools.count():
                try:
                    return method(self, *args, **kwargs)
                except ServerUnavailable:
                    if attempt >= self.retries:
                        raise
                    pause = min(FIRST_BACKOFF_S * 2**attempt, LONGEST_BACKOFF_S) * random.uniform(0.8, 1.2)
                    self.notify(f"the server at {self.address} is unavailable; trying again in {pause:.1f} s "
                                f"(retry {attempt + 1} of {self.retries}).")
                    time.sleep(pause)
        finally:
            self._retrying.active = False
    return run


@dataclass(frozen=True)
class Transfer:
    """What a streamed result cost: the file, chunks received now, chunks in the file, bytes received."""

    path: Path
    chunks_received: int
    chunk_count: int
    bytes_received: int


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or []), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


class FeatureClient:
    """A connection to one dinofeat server: every computation a server offers, written to standard files.

    Operations are tried again up to `retries` times when the server is unavailable (restarting, network
    trouble), with pauses doubling from 0.5 s to 8 s; `notify` hears about each retry. The first connection
    fails at once, in one sentence (a DinofeatError), when it cannot work (nothing listening, a host name that
    does not resolve, a TLS mismatch); other first failures are retried, announced, for up to
    `connect_timeout_s`. Every bad input or refusal is a DinofeatError with one sentence for people.

    Parameters
    ----------
    address : str
        "HOST:PORT" of a `dinofeat serve`, or "unix:PATH" of a local server's socket.
    connect_timeout_s : float, default 10
        Longest wait, in seconds, for the first connection.
    token : str, optional
        The access token of a protected server (sent as a bearer token). Not sent in clear (without TLS)
        beyond this machine unless `insecure_token` says so (see `plaintext_token_refusal`).
    tls_ca, tls_cert, tls_key : str, optional
        PEM files: the CA that signed the server's certificate, and this client's certificate and key for
        mutual TLS.
    retries : int, default 5
        Tries after the first when the server is unavailable.
    notify : callable, optional
        Called with one sentence for each retry and each notice of the server (how long a computation takes).
    insecure_token : bool, default False
        Send the token in clear to another machine (a trusted network only).

    Examples
    --------
    >>> from dinofeat_client import FeatureClient                                   # doctest: +SKIP
    >>> with FeatureClient("gpu-server:50051", token=open("token").read().strip(), tls_ca="ca.pem") as client:
    ...     client.segment(image, scribbles, "segmentation.tif", "hybrid", preset="fast")
    """

    def __init__(self, address: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 retries: int = RETRIES, notify: Callable[[str], None] = lambda message: None,
                 insecure_token: bool = False):
        if token and not (tls_ca or tls_cert) and not insecure_token:
            refusal = plaintext_token_refusal(address)
            if refusal:
                raise DinofeatError(refusal)
        self.address = address
        self.retries = retries
        self.notify = notify
        self._retrying = threading.local()
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_credential(tls_ca, "CA certificate") if tls_ca else None,
                private_key=read_credential(tls_key, "TLS key") if tls_key else None,
                certificate_chain=read_credential(tls_cert, "TLS certificate") if tls_cert else None)
            self.channel = grpc.secure_channel(address, credentials, options=channel_options(address))
        else:
            self.channel = grpc.insecure_channel(address, options=channel_options(address))
        try:
            wait_until_connected(self.channel, address, connect_timeout_s, tls_ca, tls_cert, notify)
        except BaseException:
            self.channel.close()
            raise
        channel = grpc.intercept_channel(self.channel, AskForChunkBatches(), *([BearerToken(token)] if token else []))
        self.stub = pb_grpc.FeatureServiceStub(channel)

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

    @retried
    def health(self) -> pb.HealthReply:
        """The server's version, device(s) and feature sets."""
        return self.call(self.stub.Health, pb.HealthRequest())

    @retried
    def status(self) -> pb.StatusReply:
        """What the server is doing: requests running and waiting, per client and per device, memory, cache, limits."""
        return self.call(self.stub.Status, pb.StatusRequest())

    @retried
    def feature_sets(self) -> list[pb.FeatureSetInfo]:
        """The sets this server offers: name, description and channels per image channel."""
        return list(self.call(self.stub.ListFeatureSets, pb.ListFeatureSetsRequest()).feature_sets)

    @retried
    def upload(self, image: np.ndarray) -> str:
        """Send an image unless the server holds it already (images are addressed by content); returns its sha256,
        which the server keeps within its image_store_gb. The computing methods upload for themselves."""
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

    @retried
    def fetch_features(self, image: np.ndarray, output: str | Path, computation: FeatureComputation | str = DEFAULT_SET, *,
                       compression: str = "gzip", level: int = DEFAULT_LEVEL, like: str | None = None,
                       fit_images: list[np.ndarray] | None = None, progress: Progress | None = None, **choices) -> Transfer:
        """Compute a feature stack on the server and write it to an HDF5 file, resuming a partial one.

        Parameters
        ----------
        image : ndarray
            A 2-D image (Y, X), an RGB image (Y, X, 3), or a stack of either (Z, Y, X) / (Z, Y, X, 3); uint8, uint16,
            int8, int16, int32, uint32, float32 or float64. Length-1 axes are dropped, RGBA loses alpha.
        output : str or Path
            The .h5 file to write: dataset "features", float32, shape (C, Y, X) or (C, Z, Y, X), with its channel
            names, the description of its computation and its feature space as attributes (see README, "Files").
        computation : FeatureComputation or str, default "multiscale"
            What to compute (dinofeat.contract.computation): a FeatureComputation, or a feature set's name
            ("multiscale", "classical", "ilastik", "dinov2", "attention", "hybrid") whose other fields `choices` give.
        **choices
            With a set's name: backbone (e.g. "dinov2_vits14", "dinov3_vits16"), preset ("fast", "default", "paper",
            ...), pca (int, channels kept), normalise ("none", "minmax", "zscore", "l2"), input_range ("dtype",
            "dataset"). Left out, each has FeatureComputation's default.
        compression : str, default "gzip"
            "gzip" or "none": how the HDF5 chunks are stored and sent.
        level : int, default 1
            gzip level, 1 to 9.
        like : str, optional
            A feature space as JSON (`dinofeat_client.spaces.read_stored(path).space_json` of a feature file, model
            or store): the features are expressed in it instead of a space fitted here.
        fit_images : list of ndarray, optional
            Images the space is fitted over with `image` (every image of a project, say); default `image` alone.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        Transfer
            The written file's path, chunks received (fewer when resuming) and bytes.

        Examples
        --------
        >>> with FeatureClient("127.0.0.1:50051") as client:                         # doctest: +SKIP
        ...     client.fetch_features(image, "features.h5", "dinov2", preset="fast", pca=32)
        """
        computation = described(computation, choices)
        image = check_image(image)
        output = output_file(output)
        sha = self.upload(image)
        fit_shas = [] if like else [self.upload(check_image(other)) for other in fit_images or []]  # a given space is not refitted
        key = features_result_key(sha, computation, compression, level, space_key(like or "", fit_shas))
        target = DatasetFile(output, key)
        missing = target.resumable_indices(self.notify)
        request = pb.ComputeFeaturesRequest(
            image_sha256=sha, **computation.request_fields(), encoding=pb.Encoding(compression=compression, level=level),
            resume=missing is not None, chunk_indices=missing or [], feature_space_json=like or "", fit_image_sha256=fit_shas)
        return self.receive(self.stub.ComputeFeatures(request), target, missing is not None, progress)

    @retried
    def segment(self, image: np.ndarray, labels: np.ndarray, output: str | Path, computation: FeatureComputation | str = DEFAULT_SET,
                *, probabilities: str | Path | None = None, classifier: str = DEFAULT_CLASSIFIER, trees: int = DEFAULT_TREES,
                seed: int = 0, progress: Progress | None = None, **choices) -> tuple[Path, Path | None]:
        """Train a classifier on an image's scribbles and write its class map.

        Parameters
        ----------
        image : ndarray
            A 2-D image (Y, X), an RGB image (Y, X, 3), or a stack of either (Z, Y, X) / (Z, Y, X, 3); uint8, uint16,
            int8, int16, int32, uint32, float32 or float64. Length-1 axes are dropped, RGBA loses alpha.
        labels : ndarray
            Scribbles, the image's spatial shape, an integer dtype: 0 unlabelled, each other value a class.
        output : str or Path
            The class map to write: a TIFF in the labels' dtype and values.
        computation : FeatureComputation or str, default "multiscale"
            What to compute (dinofeat.contract.computation): a FeatureComputation, or a feature set's name whose
            other fields `choices` give.
        **choices
            With a set's name: backbone, preset, pca, normalise, input_range (see `fetch_features`).
        probabilities : str or Path, optional
            Also write the per-class probabilities there (.h5, dataset "probabilities", float32, (K, Y, X)).
        classifier : str, default "extra_trees"
            "extra_trees", "random_forest", "logistic" or "gradient_boosting".
        trees : int, default 200
            Trees of a forest (1 to 5000).
        seed : int, default 0
            Random seed of the classifier (0 to 2**32 - 1): the same seed, data and computation grow the same model.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        (Path, Path or None)
            The class map and the probabilities file (None when not asked for).
        """
        computation = described(computation, choices)
        image = check_image(image)
        labels = check_labels(labels, image)
        output = output_file(output)
        probabilities_path = output_file(probabilities) if probabilities else output.with_name(f".{output.name}.probabilities.h5")
        request = pb.SegmentRequest(image_sha256=self.upload(image), labels_sha256=self.upload(labels),
                                    **computation.request_fields(), trees=trees, seed=seed, classifier=classifier)
        key = segment_result_key(request.image_sha256, request.labels_sha256, computation, classifier, trees, seed)
        transfer = self.receive(self.stub.Segment(request), DatasetFile(probabilities_path, key, resumable=False), False, progress)
        return self.write_class_map(transfer, output, labels.dtype, probabilities)

    def write_class_map(self, transfer: Transfer, output: Path, dtype: np.dtype,
                        probabilities: str | Path | None) -> tuple[Path, Path | None]:
        """The class map TIFF from a received probabilities file (removed unless the user asked for it)."""
        try:
            with h5py.File(transfer.path, "r") as f:
                class_map = class_map_from_probabilities(f["probabilities"], dtype)
            write_tiff(output, class_map)
        finally:
            if not probabilities:
                remove_quietly(transfer.path)
        return output, (transfer.path if probabilities else None)

    @retried
    def train(self, images: list[np.ndarray], labels: list[np.ndarray], output: str | Path,
              computation: FeatureComputation | str = DEFAULT_SET, *, classifier: str = DEFAULT_CLASSIFIER,
              trees: int = DEFAULT_TREES, seed: int = 0, progress: Progress | None = None, **choices) -> pb.ModelSummary:
        """Train one classifier on the labelled pixels of several images, in one feature space, and save it.

        Parameters
        ----------
        images : list of ndarray
            Training images (each as `image` of `segment`); their features share one space, fitted over all.
        labels : list of ndarray
            One label image per training image (0 unlabelled).
        output : str or Path
            The model file to write (.dfm): the classifier with the whole computation and its space, which
            `apply` (and `dinofeat apply`, the ilastik and Fiji paths) reuse.
        computation : FeatureComputation or str, default "multiscale"
            What to compute (dinofeat.contract.computation): a FeatureComputation, or a feature set's name whose
            other fields `choices` give.
        **choices
            With a set's name: backbone, preset, pca, normalise, input_range (see `fetch_features`).
        classifier : str, default "extra_trees"
            "extra_trees", "random_forest", "logistic" or "gradient_boosting".
        trees : int, default 200
            Trees of a forest (1 to 5000).
        seed : int, default 0
            Random seed of the classifier (0 to 2**32 - 1): the same seed, data and computation grow the same model.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        ModelSummary
            The model file's sha256, size in bytes, class values, labelled pixels and classifier.
        """
        computation = described(computation, choices)
        images = [check_image(i) for i in images]
        labels = [check_labels(lab, img) for lab, img in zip(labels, images)]
        output = output_file(output)
        request = pb.TrainRequest(image_sha256=[self.upload(i) for i in images], labels_sha256=[self.upload(lab) for lab in labels],
                                  **computation.request_fields(), classifier=classifier, trees=trees, seed=seed)
        pieces, summary, notices = [], None, set()
        stream = self.stub.Train(request)
        try:
            for reply in stream:
                kind = reply.WhichOneof("message")
                if kind == "progress":
                    if reply.progress.notice and reply.progress.notice not in notices:  # a long computation's estimate, once
                        notices.add(reply.progress.notice)
                        self.notify(reply.progress.notice)
                    if progress:
                        progress(reply.progress.stage, reply.progress.done, reply.progress.total)
                elif kind == "model_piece":
                    pieces.append(reply.model_piece)
                elif kind == "summary":
                    summary = reply.summary
        except grpc.RpcError as error:
            raise rpc_error(error, self.address) from None
        data = b"".join(pieces)
        if summary is None or hashlib.sha256(data).hexdigest() != summary.sha256:
            raise DinofeatError("the model file did not arrive whole; run the command again.")
        atomic_write(output, lambda tmp: tmp.write_bytes(data))
        return summary

    @retried
    def upload_model(self, path: str | Path) -> str:
        """Send a model file unless the server holds it already; returns its sha256."""
        path = Path(path)
        if not path.is_file():
            raise DinofeatError(f"cannot read {path}: no such model file.")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DinofeatError(f"cannot read the model file {path} ({error.strerror or error}).") from None
        sha = hashlib.sha256(data).hexdigest()
        if not self.call(self.stub.HasModel, pb.HasImageRequest(sha256=sha)).present:
            pieces = (pb.ModelPiece(data=data[i : i + MAX_MESSAGE_BYTES]) for i in range(0, max(len(data), 1), MAX_MESSAGE_BYTES))
            self.call(self.stub.UploadModel, pieces)
        return sha

    @retried
    def apply(self, model: str | Path, image: np.ndarray, output: str | Path, *, probabilities: str | Path | None = None,
              feature_set: str = "", progress: Progress | None = None) -> tuple[Path, Path | None]:
        """Apply a saved model file to an image, computing the model's own features in the model's own space.

        Parameters
        ----------
        model : str or Path
            A model file (.dfm) from `train`, `dinofeat train` or the napari widget.
        image : ndarray
            A 2-D image (Y, X), an RGB image (Y, X, 3), or a stack of either (Z, Y, X) / (Z, Y, X, 3); uint8, uint16,
            int8, int16, int32, uint32, float32 or float64. Length-1 axes are dropped, RGBA loses alpha.
        output : str or Path
            The class map to write: a uint16 TIFF in the model's class values.
        probabilities : str or Path, optional
            Also write the per-class probabilities there (.h5).
        feature_set : str, optional
            The set the caller expects; a model trained on another set is refused in one sentence.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        (Path, Path or None)
            The class map and the probabilities file (None when not asked for).
        """
        image = check_image(image)
        output = output_file(output)
        probabilities_path = output_file(probabilities) if probabilities else output.with_name(f".{output.name}.probabilities.h5")
        model_sha = self.upload_model(model)
        request = pb.ApplyRequest(model_sha256=model_sha, image_sha256=self.upload(image), feature_set=feature_set)
        key = apply_result_key(model_sha, request.image_sha256)
        transfer = self.receive(self.stub.Apply(request), DatasetFile(probabilities_path, key, resumable=False), False, progress)
        return self.write_class_map(transfer, output, np.dtype(np.uint16), probabilities)

    @retried
    def analyse(self, image: np.ndarray, analysis: str, output: str | Path, computation: FeatureComputation | str = DEFAULT_SET,
                *, clusters: int = 0, seed: int = 0, progress: Progress | None = None, **choices) -> Path:
        """An unsupervised picture of an image's features: k-means labels, a PCA picture or an attention foreground.

        Parameters
        ----------
        image : ndarray
            A 2-D image (Y, X), an RGB image (Y, X, 3), or a stack of either (Z, Y, X) / (Z, Y, X, 3); uint8, uint16,
            int8, int16, int32, uint32, float32 or float64. Length-1 axes are dropped, RGBA loses alpha.
        analysis : str
            "kmeans" (dataset "labels", uint16 clusters), "pca" (dataset "picture", uint8 RGB of the first three
            principal components) or "foreground" (dataset "mask", uint8, from the DINOv2 attention; any set).
        output : str or Path
            The .h5 file to write, shape (K, Y, X) or (K, Z, Y, X).
        computation : FeatureComputation or str, default "multiscale"
            What to compute (dinofeat.contract.computation): a FeatureComputation, or a feature set's name whose
            other fields `choices` give.
        **choices
            With a set's name: backbone, preset, pca, normalise, input_range (see `fetch_features`).
        clusters : int
            k-means clusters, 2 to 256 (needed for "kmeans").
        seed : int, default 0
            Random seed of k-means and of the sample the analysis is fitted on.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        Path
            The written file.
        """
        computation = described(computation, choices)
        image = check_image(image)
        output = output_file(output)
        request = pb.AnalyseRequest(image_sha256=self.upload(image), **computation.request_fields(), analysis=analysis,
                                    clusters=clusters, seed=seed)
        key = result_key(analysis, request.image_sha256, computation.key(), clusters, seed)
        return self.receive(self.stub.Analyse(request), DatasetFile(output, key, resumable=False), False, progress).path

    @retried
    def few_shot(self, supports: list[np.ndarray], masks: list[np.ndarray], query: np.ndarray, output: str | Path,
                 computation: FeatureComputation | str = DEEP_DEFAULT_SET, *, window: int = DEFAULT_WINDOW,
                 grid: int = DEFAULT_GRID, components: str = "auto", progress: Progress | None = None, **choices) -> Path:
        """Segment `query` from a few support images and their object masks (DINOv2 prototypes, seed 001's method).

        Parameters
        ----------
        supports : list of ndarray
            Support images (as `image` of `fetch_features`); one stack alone is read as a volume (its masks'
            middle slices of three sections).
        masks : list of ndarray
            One mask per support image, its spatial shape: non-zero is the object.
        query : ndarray
            The image to segment.
        output : str or Path
            The .h5 file to write: dataset "fewshot", float32, channels [mask, foreground_probability].
        computation : FeatureComputation or str, default "dinov2"
            What to compute (dinofeat.contract.computation): a FeatureComputation, or a feature set's name whose
            other fields `choices` give.
        **choices
            With a set's name: backbone, preset, pca, normalise, input_range (see `fetch_features`).
        window : int, default 4
            The prototypes' pooling window, in grid cells (1 to 64).
        grid : int, default 4
            The feature grid's cell, in pixels (1 to 64): features are average-pooled to it first.
        components : str, default "auto"
            "auto" keeps the most confident connected component when every support mask shows one solid object
            and every component otherwise; "most_confident" or "all" force either.
        progress : callable, optional
            Called as progress(stage, done, total) while the server works and the result arrives.

        Returns
        -------
        Path
            The written file.
        """
        computation = described(computation, choices)
        supports = [check_image(s) for s in supports]
        query = check_image(query)
        output = output_file(output)
        request = pb.FewShotRequest(support_sha256=[self.upload(s) for s in supports],
                                    support_mask_sha256=[self.upload(np.ascontiguousarray(without_singleton_axes(m))) for m in masks],
                                    query_sha256=self.upload(query), **computation.request_fields(), window=window, grid=grid,
                                    components=components)
        key = result_key("fewshot", request.query_sha256, list(request.support_sha256), list(request.support_mask_sha256),
                         computation.key(), window or DEFAULT_WINDOW, grid or DEFAULT_GRID, components)
        return self.receive(self.stub.FewShot(request), DatasetFile(output, key, resumable=False), False, progress).path

    def receive(self, stream, target: DatasetFile, resume: bool, progress: Progress | None) -> Transfer:
        """Write a DatasetStream into `target`; on any failure keep its partial file when it is resumable
        (flushed: a resume finds every chunk that arrived). The server's notices go to `notify`, each once."""
        received = nbytes = expected = 0
        notices: set[str] = set()
        keep_freed_memory()
        try:
            for message in stream:
                kind = message.WhichOneof("message")
                if kind == "progress":
                    if message.progress.notice and message.progress.notice not in notices:  # once, not per slice
                        notices.add(message.progress.notice)
                        self.notify(message.progress.notice)
                    if progress:
                        progress(message.progress.stage, message.progress.done, message.progress.total)
                elif kind == "header":
                    header = message.header
                    layout = DatasetLayout(header.name, header.dtype, tuple(header.shape), tuple(header.chunk_shape),
                                           header.encoding.compression, header.encoding.level)
                    if header.result_key != target.key:
                        raise DinofeatError("the server describes its result differently from this client; update dinofeat on both sides.")
                    target.open(layout, json.loads(header.attributes_json), resume)
                    expected = header.chunk_count
                elif kind in ("chunk", "chunks"):
                    for chunk in chunks_of(message):
                        data = chunk.data  # each reading copies the bytes out of the message
                        target.write_chunk(tuple(chunk.offset), data, chunk.filter_mask, chunk.sha256, chunk.crc32)
                        nbytes += len(data)
                        received += 1
                        if progress:
                            progress("receiving", received, expected)
                elif kind == "trailer":
                    path = target.finish(message.trailer.chunk_count, message.trailer.sha256)
                    return Transfer(path, received, message.trailer.chunk_count, nbytes)
        except grpc.RpcError as error:
            raise rpc_error(error, self.address) from None
        finally:
            stream.cancel()
            target.discard()  # after finish: nothing left to do
        raise DinofeatError("the server ended the stream early; run the same command again to resume.")


def described(computation: FeatureComputation | str, choices: dict) -> FeatureComputation:
    """The checked computation a client method was given: a FeatureComputation, or a set's name with `choices` for
    its other fields (a FeatureComputation with choices too is refused: one description, not two)."""
    if isinstance(computation, FeatureComputation):
        if choices:
            raise TypeError(f"give the computation's fields inside it, not beside it: {', '.join(sorted(choices))}")
        return computation.checked()
    try:
        return FeatureComputation(computation, **choices).checked()
    except TypeError:
        raise TypeError(f"unknown choices for a feature computation: {', '.join(sorted(choices))}") from None


def class_map_from_probabilities(probabilities: h5py.Dataset, dtype: np.dtype) -> np.ndarray:
    """Most probable class per pixel, in the user's label values, read slice by slice."""
    values = np.asarray(probabilities.attrs["class_values"]).astype(dtype)
    if probabilities.ndim == 3:
        return values[np.argmax(probabilities[()], axis=0)]
    return np.stack([values[np.argmax(probabilities[:, z], axis=0)] for z in range(probabilities.shape[1])])


PLAINTEXT_TOKEN_FLAG = "--insecure-token"
PLAINTEXT_TOKEN_VARIABLE = "DINOFEAT_INSECURE_TOKEN"
"""What lets the CLI send a token in clear beyond this machine (FeatureClient's `insecure_token`)."""


def plaintext_token_refusal(address: str) -> str | None:
    """Why a token must not go in clear (without TLS) to `address`, or None when it stays on this machine:
    a loopback address (127.0.0.0/8, ::1), localhost, a Unix socket, or a name that resolves only to loopback."""
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    where = host_and_port(address)
    if where is not None and is_loopback_host(*where):
        return None
    host = where[0] if where else address
    return (f"refusing to send the access token in clear to {host}, which is not this machine: pass --tls-ca CA.pem "
            f"for a server with TLS, or {PLAINTEXT_TOKEN_FLAG} (or {PLAINTEXT_TOKEN_VARIABLE}=1) to send it anyway "
            "on a network you trust.")


def is_loopback_host(host: str, port: int) -> bool:
    """Whether `host` is this machine's loopback: an address in 127.0.0.0/8 or ::1, localhost, or a name
    that resolves to nothing else (a name that does not resolve is not)."""
    if host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        try:
            found = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError):
            return False
        return bool(found) and all(is_loopback_host(a, port) for a in found)  # literal addresses: no second lookup
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def rpc_error(error: grpc.RpcError, address: str) -> DinofeatError:
    """One sentence for a failed call: the server's own message for bad input, else what happened."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(f"lost the connection to the dinofeat server at {address}; run the same command again to resume.")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return DinofeatError(f"the server at {address} refused the request: {error.details()}")
    if code == grpc.StatusCode.CANCELLED:
        return DinofeatError("the request was cancelled before it finished; run the same command again to resume.")
    return DinofeatError(error.details() or f"the server failed with {code.name}.")
