"""The gRPC FeatureService: validate requests, hand work to the engine threads, stream results."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from dinofeat import __version__
from dinofeat.contract.chunk_batches import asks_for_batches, keep_freed_memory
from dinofeat.contract.computation import DEEP_DEFAULT_SET, DEFAULT_SET, FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.images import check_labels, check_mask
from dinofeat.contract.wire import DEFAULT_GRID, DEFAULT_WINDOW, features_result_key, space_key
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc

from ..engine.stacks import FEATURE_SETS, FeatureSet, feature_set
from ..segment.fewshot import checked_components
from .checks import (
    check_analysis,
    check_channels,
    check_classes,
    check_grid,
    check_model_size,
    check_output_size,
    check_pairs,
    check_probabilities,
    check_upload_size,
    checked_classifier,
    checked_computation,
    checked_encoding,
    checked_model,
    checked_seed,
    requested_space,
)
from .config import ServerLimits
from .device_pool import DevicePool, PoolDevice
from .feature_memory import FeatureMemory
from .failures import ANSWERED, ClientGone, OutOfTime, Refused, Stalled, ending_of
from .image_store import ContentStore, ImageStore, check_layout, image_from_bytes
from .jobs import Job, analyse_work, apply_work, feature_stream, fewshot_work, segment_work, train_work
from .training import Training
from .result_cache import ResultCache
from .scheduler import FairScheduler, Slot, estimated_work
from .security import TokenAuthentication, client_identity
from .streaming import ThreadPerCall, messages_from_thread
from .threads import use_threads
from .usage import Usage

if TYPE_CHECKING:
    from ..segment.model_file import TrainedModel
# segment.model_file (skops, which scans scikit-learn at import) is imported when a model file arrives.

REQUEST_LOG = logging.getLogger("dinofeat.requests")
"""One JSON line per streaming call; no tokens or image contents ever go into it."""


SET_ASIDE_S = 2.0
"""A stream whose client has read nothing for this long lends its worker to waiting requests (see _send)."""
STALL_POLL_S = 0.5
"""How often a stalled stream looks for waiting requests to hand its worker to."""


def read_model_file(pieces: list[bytes]) -> tuple[str, TrainedModel]:
    """(sha256, model) of an uploaded model file's pieces, checked and unpacked within limits."""
    from ..segment.model_file import model_from_bytes

    data = b"".join(pieces)
    return hashlib.sha256(data).hexdigest(), model_from_bytes(data)


def rpc(method: Callable) -> Callable:
    """A FeatureService method whose failures end its call once, here: with their status and sentence
    (failures.ENDINGS), refusals and stalls counted for its client; a client gone while a message was being
    written ends it quietly. Nothing of the method runs after its failure."""

    @functools.wraps(method)
    async def answered(self: FeatureServicer, request, context: grpc.aio.ServicerContext):
        client = self._client(context)  # now: a cancelled call's context must not be asked for its peer
        try:
            return await method(self, request, context)
        except ANSWERED as error:
            await self._end(context, client, error)
        except ClientGone:
            return None

    return answered




class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """One per server: holds the uploaded images, the device pool and the engine's request threads (one
    per worker of the pool, each computing with `limits.threads_per_worker` threads, see threads.py)."""

    def __init__(self, pool: DevicePool, limits: ServerLimits = ServerLimits(), cache: ResultCache | None = None,
                 authentication: TokenAuthentication | None = None):
        self.pool = pool
        self.device = pool.devices[0].device
        self.limits = limits
        self.authentication = authentication
        self.store = ImageStore(int(limits.image_store_gb * 1e9), limits.client_upload_bytes)
        self.trained_models = ContentStore(int(limits.models_gb * 1e9), size_of=lambda model: model.unpacked_bytes)
        self.cache = cache
        self.feature_memory = FeatureMemory()
        self.finished = self.cancelled = self.refused = 0
        self.usage = Usage()
        self.scheduler = FairScheduler(limits.workers, limits.queue_length, limits.max_streams_per_client, pool)
        self.threads = limits.threads_per_worker(len(pool.devices))
        self.executor = ThreadPerCall("dinofeat-engine", use_threads, self.threads)
        keep_freed_memory()

    @property
    def device_names(self) -> str:
        """"cpu", or the pool's devices as "cuda:0,cuda:1"."""
        return ",".join(str(d.device) for d in self.pool.devices)

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        return client_identity(self.authentication, context.invocation_metadata(), context.peer())

    async def _end(self, context: grpc.aio.ServicerContext, client: str, error: Exception) -> None:
        """End a call with the status of its failure (failures.ENDINGS) and its sentence, counting refusals and
        stalls of `client`."""
        if isinstance(error, Refused):
            self.refused += 1
            self.usage.of(client).refused += 1
        elif isinstance(error, Stalled):
            self.usage.of(client).stalled += 1
        await context.abort(ending_of(error).status, str(error))

    def _stall(self, what: str) -> Stalled:
        """The failure of a client that `what` ("read", "sent") nothing for stall_seconds."""
        return Stalled(f"the client {what} nothing for {self.limits.stall_seconds:g} s (this server's stall_seconds), "
                       "so the server ended the call to free its worker; try again and keep the connection busy.")

    async def _send(self, context: grpc.aio.ServicerContext, message, slot: Slot | None = None) -> None:
        """Write one message, or raise Stalled when the client has read nothing for stall_seconds. While the
        client reads nothing for SET_ASIDE_S and other requests wait, `slot`'s worker goes to them; the
        stream takes it back, before any newcomer, once its client reads again."""
        loop = asyncio.get_running_loop()
        write = asyncio.ensure_future(context.write(message))
        began = loop.time()
        try:
            await asyncio.wait([write], timeout=min(SET_ASIDE_S, self.limits.stall_seconds))
            while not write.done():
                if slot is not None and self.scheduler.others_wait:
                    self.scheduler.set_aside(slot)
                left = self.limits.stall_seconds - (loop.time() - began)
                if left <= 0:
                    raise self._stall("read")
                await asyncio.wait([write], timeout=min(left, STALL_POLL_S))
            if write.exception() is not None:  # a write fails only on a call that has ended: the client went away
                raise ClientGone() from write.exception()
        finally:
            write.cancel()  # nothing once written; a stalled write is abandoned
        if slot is not None and not slot.held:
            await self.scheduler.take_back(slot)

    async def _received(self, request_iterator):
        """An upload's messages, each due within stall_seconds of the one before (else Stalled)."""
        messages = aiter(request_iterator)
        while True:
            try:
                yield await asyncio.wait_for(anext(messages), self.limits.stall_seconds)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self._stall("sent") from None

    def _seconds_allowed(self, context: grpc.aio.ServicerContext) -> float:
        """The server's longest request, or less when the client's own deadline comes first."""
        remaining = context.time_remaining()
        return min(self.limits.max_request_seconds, remaining) if remaining is not None else self.limits.max_request_seconds

    async def _stream(self, work: Job, context: grpc.aio.ServicerContext) -> None:
        """Wait for a fair turn, then run `work` on the granted worker (its device and that device's models)
        and send its messages; its failures end the call through `rpc` (bad input found while working,
        a full queue, running too long, a client that stops reading). The worker is free again only once its
        thread has stopped.

        Every call leaves one structured log line: client, method, device of its worker, seconds, bytes sent, outcome."""
        started, outcome = time.perf_counter(), "abandoned"
        peer = context.peer()  # now: asking a cancelled call's context for its peer crashes grpc (SIGSEGV)
        client, allowed = self._client(context), self._seconds_allowed(context)
        totals = self.usage.of(client)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + allowed
        sent, delivered, device = 0, False, ""
        try:
            async with self.scheduler.slot(client, allowed, estimated_work(work)) as slot:
                device = str(slot.device.device)
                messages = messages_from_thread(self._on_worker(work, slot.device), self.executor, max(deadline - loop.time(), 0),
                                                batches=asks_for_batches(context.invocation_metadata() or ()))
                async with contextlib.aclosing(messages):
                    async for message, size in messages:
                        delivered = message.WhichOneof("message") in ("trailer", "summary")  # the client may hang up once it has the end
                        await self._send(context, message, slot)
                        sent += size
                        totals.bytes_sent += size
            delivered = True
        except TimeoutError:
            outcome = "deadline_exceeded"
            raise OutOfTime(f"the request ran out of time after {allowed:.0f} s (this server's limit, or the client's deadline); "
                            "ask for a smaller image or a faster preset.") from None
        except asyncio.CancelledError:
            if not delivered:  # a client that hangs up once it has the end has not cancelled
                outcome = "cancelled"
                self._count_cancelled(totals)
            raise
        except BaseException as error:
            ending = ending_of(error)
            outcome = ending.outcome if ending else "error"
            if isinstance(error, ClientGone):
                self._count_cancelled(totals)
            raise
        finally:
            if delivered and outcome == "abandoned":
                outcome = "ok"
                totals.finished += 1
            self.finished += 1
            REQUEST_LOG.info(json.dumps({"peer": peer, "client": client, "method": work.name,
                                         "device": device, "seconds": round(time.perf_counter() - started, 3), "bytes": sent,
                                         "outcome": outcome}))

    def _count_cancelled(self, totals) -> None:
        self.cancelled += 1
        totals.cancelled += 1

    def _on_worker(self, work: Job, worker: PoolDevice) -> Callable[[object], Iterator]:
        """`work` computing on `worker`'s device with its models, which lend it idle workers for tiles."""
        models = self.pool.models(worker)
        return lambda cancelled: models.released(work(models=models, device=worker.device, cancelled=cancelled))

    def _image(self, sha256: str, what: str = "image") -> np.ndarray:
        image = self.store.get(sha256)
        if image is None:
            raise DinofeatError(f"the server holds no {what} with sha256 {sha256[:12]}...; upload it first.")
        return image

    async def _checked_labels(self, shas: list[str], images: list[np.ndarray]) -> list[np.ndarray]:
        """The label images of `images`, checked (their classes counted) off the event loop: a large label
        image takes seconds."""
        labels = [self._image(sha, "label image") for sha in shas]
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: [check_labels(lab, image) for lab, image in zip(labels, images)])

    def _training(self, request: pb.SegmentRequest | pb.TrainRequest) -> Training:
        """How the request trains its classifier, checked, with this server's limits and threads."""
        return Training(checked_classifier(request.classifier, request.trees), request.trees, checked_seed(request.seed),
                        self.limits.max_training_gb, self.threads)

    def _requested_features(self, request, images: list[np.ndarray],
                            default_set: str = DEFAULT_SET) -> tuple[FeatureSet, FeatureComputation]:
        """The request's feature set and computation, checked, within this server's channel limit for `images`."""
        computation = checked_computation(request.feature_set, request.options, default_set)
        fset = feature_set(computation.feature_set)
        check_channels(fset, computation, images, self.limits.max_channels)
        return fset, computation

    @contextlib.asynccontextmanager
    async def _upload(self, context: grpc.aio.ServicerContext, what: str):
        """The body receives an upload of `what` and yields `reserve(n)`: the upload counts as one call of
        its client, reserves memory as it grows (the client's share of the image store), and may take
        max_request_seconds in all."""
        client = self._client(context)
        try:
            with self.scheduler.call(client), self.store.reservation(client) as reserve:
                async with asyncio.timeout(self._seconds_allowed(context)):
                    yield reserve
        except TimeoutError:
            raise OutOfTime(f"the {what} ran out of time (this server's max_request_seconds, or the client's deadline); "
                            "send less or use a faster connection.") from None

    async def _image_upload(self, request_iterator, reserve) -> tuple[pb.ImageLayout, str, bytearray]:
        """(layout, sha256, bytes) of an upload: the header first, then exactly the bytes it announces,
        written into one buffer reserved at the header."""
        header, data, received = None, bytearray(), 0
        async for message in self._received(request_iterator):
            if message.WhichOneof("part") == "header":
                if header is not None:
                    raise DinofeatError("an upload has one header; send the layout once, then the bytes.")
                header = message.header
                layout = header.layout
                expected = check_layout(layout.dtype, tuple(layout.shape), layout.axes, self.limits.max_pixels)
                check_upload_size(expected, self.limits)
                reserve(expected)
                data = bytearray(expected)
                continue
            if header is None:
                raise DinofeatError("an upload must start with its header (layout and sha256).")
            if received + len(message.data) > expected:
                raise DinofeatError(f"the upload sent more than the {expected} bytes its layout announces.")
            data[received:received + len(message.data)] = message.data
            received += len(message.data)
        if header is None:
            raise DinofeatError("the upload was empty; send a header and the image bytes.")
        if received != expected:
            raise DinofeatError(f"the upload sent {received} bytes but its layout needs {expected}.")
        return header.layout, header.sha256, data

    # The RPCs, in the order of protos/dinofeat/v1/feature_service.proto's FeatureService.

    @rpc
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(version=__version__, device=self.device_names, feature_sets=list(FEATURE_SETS))

    @rpc
    async def ListFeatureSets(self, request: pb.ListFeatureSetsRequest, context: grpc.aio.ServicerContext) -> pb.ListFeatureSetsReply:
        return pb.ListFeatureSetsReply(feature_sets=[
            pb.FeatureSetInfo(name=f.name, description=f.description, channels_per_image_channel=len(f.channel_names(1)))
            for f in FEATURE_SETS.values()
        ])

    @rpc
    async def HasImage(self, request: pb.HasImageRequest, context: grpc.aio.ServicerContext) -> pb.HasImageReply:
        return pb.HasImageReply(present=request.sha256 in self.store)

    @rpc
    async def UploadImage(self, request_iterator: AsyncIterator[pb.UploadImageChunk],
                          context: grpc.aio.ServicerContext) -> pb.UploadImageReply:
        """Receive an image into memory reserved for it, with no gap longer than stall_seconds; converting
        and hashing run off the event loop."""
        async with self._upload(context, "upload") as reserve:
            layout, sha256, data = await self._image_upload(request_iterator, reserve)
            image = await asyncio.get_running_loop().run_in_executor(
                None, image_from_bytes, data, layout.dtype, tuple(layout.shape), layout.axes, sha256)
        self.store.put(sha256, image)
        return pb.UploadImageReply(sha256=sha256, bytes_received=len(data))

    @rpc
    async def ComputeFeatures(self, request: pb.ComputeFeaturesRequest, context: grpc.aio.ServicerContext) -> None:
        image = self._image(request.image_sha256)
        fset, options = self._requested_features(request, [image])
        check_output_size(fset, options, image, self.limits.max_output_gb)
        encoding = checked_encoding(request.encoding)
        like = await asyncio.get_running_loop().run_in_executor(None, requested_space, request.feature_space_json)
        fit_images = None if like else [self._image(sha, "image to fit the space on") for sha in request.fit_image_sha256]
        if fit_images and request.image_sha256 not in request.fit_image_sha256:
            fit_images.append(image)
        wanted = set(request.chunk_indices) if request.resume else None
        key = features_result_key(request.image_sha256, options, encoding.compression, encoding.level,
                                  space_key(request.feature_space_json, list(request.fit_image_sha256)))
        await self._stream(Job(feature_stream, fset, options, (image, *(fit_images or ())),
                               dict(image=image, encoding=encoding, key=key, cache=self.cache, wanted=wanted, like=like,
                                    fit_images=fit_images or None)), context)

    @rpc
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> None:
        image = self._image(request.image_sha256)
        labels = (await self._checked_labels([request.labels_sha256], [image]))[0]
        await asyncio.get_running_loop().run_in_executor(None, check_classes, [labels], self.limits, image)
        fset, options = self._requested_features(request, [image])
        encoding = checked_encoding(request.encoding)
        training = self._training(request)
        await self._stream(Job(segment_work, fset, options, (image, labels),
                               dict(image=image, labels=labels, training=training, encoding=encoding, memory=self.feature_memory)),
                           context)

    @rpc
    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> None:
        check_pairs(request.image_sha256, request.labels_sha256, "give one label image per training image.")
        images = [self._image(sha) for sha in request.image_sha256]
        labels = await self._checked_labels(request.labels_sha256, images)
        await asyncio.get_running_loop().run_in_executor(None, check_classes, labels, self.limits)
        fset, options = self._requested_features(request, images)
        training = self._training(request)
        await self._stream(Job(train_work, fset, options, (*images, *labels), dict(images=images, labels=labels, training=training)),
                           context)

    @rpc
    async def HasModel(self, request: pb.HasImageRequest, context: grpc.aio.ServicerContext) -> pb.HasImageReply:
        return pb.HasImageReply(present=request.sha256 in self.trained_models)

    @rpc
    async def UploadModel(self, request_iterator: AsyncIterator[pb.ModelPiece],
                          context: grpc.aio.ServicerContext) -> pb.UploadModelReply:
        """Receive a model file (counted like an image upload); joining, hashing and unpacking within
        limits run off the event loop."""
        async with self._upload(context, "model upload") as reserve:
            pieces, size = [], 0
            async for piece in self._received(request_iterator):
                size += len(piece.data)
                check_model_size(size)
                reserve(len(piece.data))
                pieces.append(piece.data)
            sha, model = await asyncio.get_running_loop().run_in_executor(None, read_model_file, pieces)
        self.trained_models.put(sha, model)
        return pb.UploadModelReply(sha256=sha)

    @rpc
    async def Apply(self, request: pb.ApplyRequest, context: grpc.aio.ServicerContext) -> None:
        model = checked_model(self.trained_models.get(request.model_sha256), request.feature_set)
        image = self._image(request.image_sha256)
        check_probabilities(len(model.metadata["class_values"]), image, self.limits)
        fset = feature_set(model.metadata["feature_set"])
        encoding = checked_encoding(request.encoding)
        await self._stream(Job(apply_work, fset, model.computation(), (image,),
                               dict(model=model, model_sha=request.model_sha256, image=image, encoding=encoding, threads=self.threads)),
                           context)

    @rpc
    async def Analyse(self, request: pb.AnalyseRequest, context: grpc.aio.ServicerContext) -> None:
        image = self._image(request.image_sha256)
        fset, options = self._requested_features(request, [image])
        check_analysis(request.analysis, request.clusters)
        seed = checked_seed(request.seed)
        await self._stream(Job(analyse_work, fset, options, (image,),
                               dict(image=image, analysis=request.analysis, clusters=request.clusters, seed=seed)), context)

    @rpc
    async def FewShot(self, request: pb.FewShotRequest, context: grpc.aio.ServicerContext) -> None:
        check_pairs(request.support_sha256, request.support_mask_sha256, "give one mask per support image.")
        supports = [self._image(sha, "support image") for sha in request.support_sha256]
        masks = [check_mask(self._image(sha, "support mask"), image) for sha, image in zip(request.support_mask_sha256, supports)]
        query = self._image(request.query_sha256, "query image")
        fset, options = self._requested_features(request, [*supports, query], DEEP_DEFAULT_SET)
        window, grid = request.window or DEFAULT_WINDOW, request.grid or DEFAULT_GRID
        check_grid(grid, window, supports)
        components = checked_components(request.components)
        await self._stream(Job(fewshot_work, fset, options, (*supports, *masks, query),
                               dict(supports=supports, masks=masks, query=query, window=window, grid=grid, components=components)),
                           context)

    @rpc
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        devices = self.pool.report()
        uploads = self.store.in_flight()  # one snapshot: the per-client rows and the total agree
        return pb.StatusReply(
            version=__version__, device=self.device_names, running=self.scheduler.running, finished=self.finished,
            queued=self.scheduler.queued, workers=self.pool.slots, threads_per_worker=self.threads,
            queue_length=self.limits.queue_length,
            cancelled=self.cancelled, refused=self.refused, devices=devices, loaded_models=self.pool.loaded(),
            device_memory_allocated_bytes=sum(d.memory_allocated_bytes for d in devices),
            device_memory_total_bytes=sum(d.memory_total_bytes for d in devices),
            cache_bytes=self.cache.used_bytes() if self.cache else 0, cache_budget_bytes=self.cache.budget_bytes if self.cache else 0,
            images_held=len(self.store), image_bytes=self.store.used_bytes(),
            clients=self.usage.report(self.scheduler.use(), uploads),
            upload_bytes=sum(uploads.values()), model_bytes=self.trained_models.used_bytes(),
            limits_json=json.dumps(dataclasses.asdict(self.limits)))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
