"""FairScheduler: round-robin turns between clients, a bounded queue and a per-client stream limit."""

from __future__ import annotations

import asyncio

import pytest
from dinofeat_server.service.scheduler import FairScheduler, QueueFull


async def hold(scheduler: FairScheduler, client: str, order: list[str], release: asyncio.Event) -> None:
    async with scheduler.slot(client):
        order.append(client)
        await release.wait()


async def started(scheduler: FairScheduler, *clients: str) -> tuple[list[str], list[asyncio.Task], asyncio.Event]:
    """Start one request per entry of `clients`, in that order, and let them reach the queue."""
    order, release = [], asyncio.Event()
    tasks = []
    for client in clients:
        tasks.append(asyncio.create_task(hold(scheduler, client, order, release)))
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    return order, tasks, release


def test_a_small_request_goes_before_a_heavy_users_backlog():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=64, streams_per_client=16)
        order, tasks, release = await started(scheduler, *["heavy"] * 10, "light")
        assert order == ["heavy"] and scheduler.queued == 10
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario())[:3] == ["heavy", "light", "heavy"]


def test_turns_go_to_the_least_recently_served_client():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=64, streams_per_client=16)
        order, tasks, release = await started(scheduler, "a", "a", "a", "b", "b", "c")
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "a", "b", "a"]


def test_a_full_queue_refuses_at_once():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=2, streams_per_client=16)
        order, tasks, release = await started(scheduler, "a", "b", "c")
        with pytest.raises(QueueFull, match="queue is full"):
            async with scheduler.slot("d"):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert scheduler.running == 0 and scheduler.queued == 0

    asyncio.run(scenario())


def test_a_client_cannot_open_more_streams_than_its_limit():
    async def scenario():
        scheduler = FairScheduler(workers=4, queue_length=64, streams_per_client=2)
        order, tasks, release = await started(scheduler, "a", "a")
        with pytest.raises(QueueFull, match="2 requests or uploads open"):
            async with scheduler.slot("a"):
                pass
        async with scheduler.slot("b"):
            assert scheduler.running == 3
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_its_turn_passes_on():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=8, streams_per_client=8)
        order, tasks, release = await started(scheduler, "a", "b", "c")
        tasks[1].cancel()
        await asyncio.sleep(0)
        assert scheduler.queued == 1
        release.set()
        await asyncio.gather(tasks[0], tasks[2])
        return order, scheduler

    order, scheduler = asyncio.run(scenario())
    assert order == ["a", "c"] and scheduler.running == 0


def test_waiting_longer_than_the_timeout_raises_timeout_error():
    async def scenario():
        scheduler = FairScheduler(workers=1, queue_length=8, streams_per_client=8)
        order, tasks, release = await started(scheduler, "a")
        with pytest.raises(TimeoutError):
            async with scheduler.slot("b", timeout=0.05):
                pass
        assert scheduler.queued == 0
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
