"""Fair by work, not by count: a small request runs beside large ones that hold every worker, and the worker
of a client that stops reading goes to the requests waiting and comes back when the client reads again.

The scheduler's rules are checked on FairScheduler directly (no computing); one test runs them through a
real in-process server (its client, servicer, scheduler and engine).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
from conftest import InProcessServer, noise, wait_for
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat_server.service.config import ServerLimits
from dinofeat_server.service.scheduler import SMALL_WORK, FairScheduler

LARGE = None
"""The work estimate of a request the scheduler cannot size (never small)."""
SMALL = 128 * 128 * 58
"""A 128 x 128 image in the classical set."""


async def held(scheduler: FairScheduler, client: str, work: int | None, release: asyncio.Event) -> None:
    async with scheduler.slot(client, work=work):
        await release.wait()


def test_a_small_request_starts_while_large_ones_hold_every_worker():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=8, streams_per_client=4)
        release = asyncio.Event()
        large = [asyncio.create_task(held(scheduler, f"large-{n}", LARGE, release)) for n in range(2)]
        await asyncio.sleep(0)
        async with asyncio.timeout(1), scheduler.slot("small", work=SMALL):
            running, queued = scheduler.running, scheduler.queued
        release.set()
        await asyncio.gather(*large)
        return running, queued

    assert asyncio.run(scenario()) == (2, 1)  # the small one ran beside the first large one; the second large one waited


def test_work_beyond_the_small_size_waits_for_a_worker():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=8, streams_per_client=4)
        async with scheduler.slot("large", work=LARGE):
            try:
                async with asyncio.timeout(0.2), scheduler.slot("medium", work=SMALL_WORK + 1):
                    return "ran"
            except TimeoutError:
                return "waited"

    assert asyncio.run(scenario()) == "waited"


def test_a_slot_set_aside_goes_to_the_waiting_request_and_comes_back_first():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=8, streams_per_client=4)
        order = []
        async with scheduler.slot("stalled", work=LARGE) as stalled:
            async def other(name: str):
                async with scheduler.slot(name, work=LARGE):
                    order.append(name)
                    await asyncio.sleep(0.05)

            first = asyncio.create_task(other("waiting"))
            await asyncio.sleep(0)
            scheduler.set_aside(stalled)  # its client stopped reading
            await asyncio.sleep(0.01)
            newcomer = asyncio.create_task(other("newcomer"))
            await asyncio.sleep(0)
            await scheduler.take_back(stalled)  # its client reads again: back before the newcomer
            order.append("stalled")
        await asyncio.gather(first, newcomer)
        return order

    assert asyncio.run(scenario()) == ["waiting", "stalled", "newcomer"]


def test_a_stalled_readers_worker_serves_another_client_and_the_stalled_stream_then_completes(tmp_path):
    server = InProcessServer(limits=ServerLimits(workers=1, stall_seconds=60, memory_gb=2))
    try:
        with server.client() as staller, server.client() as other:
            sha = staller.upload(noise(1, 512))  # about 40 MB of features: far more than the connection's buffers
            with grpc.insecure_channel(server.address) as channel:
                call = pb_grpc.FeatureServiceStub(channel).ComputeFeatures(pb.ComputeFeaturesRequest(image_sha256=sha, feature_set="classical"))
                wait_for(lambda: staller.status().running == 1, what="the unread stream computing")
                time.sleep(1)
                started = time.monotonic()
                other.fetch_features(noise(2, 512), tmp_path / "other.h5", "classical")  # not small: needs the worker
                waited = time.monotonic() - started
                kinds = [message.WhichOneof("message") for message in call]  # the staller reads again
        assert waited < 10, f"another client's request waited {waited:.0f} s behind a client that reads nothing"
        assert kinds[-1] == "trailer"
        assert (tmp_path / "other.h5").exists()
    finally:
        server.stop()


def test_a_small_request_is_answered_while_a_large_one_computes(tmp_path):
    server = InProcessServer(limits=ServerLimits(workers=1, memory_gb=2))
    try:
        with server.client() as large_client, server.client() as small_client:
            finished = {}

            def fetch_large() -> None:
                large_client.fetch_features(noise(3, 1024), tmp_path / "large.h5", "classical")
                finished["large"] = time.monotonic()

            large = threading.Thread(target=fetch_large)
            large.start()
            wait_for(lambda: small_client.status().running == 1, what="the large request computing")
            small_client.fetch_features(noise(4, 96), tmp_path / "small.h5", "classical")
            finished["small"] = time.monotonic()
            large.join()
        assert finished["small"] < finished["large"]
    finally:
        server.stop()


def test_the_work_estimate_is_pixels_times_channels():
    from dinofeat.contract.computation import FeatureComputation
    from dinofeat_server.engine.stacks import feature_set
    from dinofeat_server.service.jobs import Job, feature_stream
    from dinofeat_server.service.scheduler import estimated_work

    image = np.zeros((100, 200), np.uint8)
    work = Job(feature_stream, feature_set("classical"), FeatureComputation("classical"), (image,), dict(image=image))
    assert estimated_work(work) == 100 * 200 * 58
