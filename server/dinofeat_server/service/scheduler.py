"""Fair admission of work: a bounded queue served round-robin between clients.

As many requests run at once as the device pool has slots (workers x devices, device_pool.py); each
gets a slot on the least loaded device. The others wait in one queue per client, and a freed worker
goes to the waiting client served least recently, so a user with ten large requests waiting cannot
hold back another user's small one. The queue has a fixed length and each client a fixed number of
open calls (streams and uploads together); beyond either the request is refused at once
(RESOURCE_EXHAUSTED) instead of piling up. While requests wait, the pool lends no slot to running
requests for their tiles, and a lent slot that comes back wakes the scheduler to hand it on.
Lives on the event loop: every method is called from the loop's thread (the pool has its own lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator

from .device_pool import DevicePool, PoolDevice


class QueueFull(Exception):
    """No room for the request: the queue is full or the client has too many calls (streams and uploads) open."""


class FairScheduler:
    """Round-robin between clients over the slots of `pool` (by default `workers` on the CPU), with
    `queue_length` waiting requests at most."""

    def __init__(self, workers: int, queue_length: int, streams_per_client: int, pool: DevicePool | None = None):
        self.pool = pool or DevicePool.on_cpu(workers)
        self.workers = self.pool.slots
        self.queue_length = queue_length
        self.streams_per_client = streams_per_client
        self.running = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[PoolDevice]]] = OrderedDict()
        self._calls: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._tickets = itertools.count()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def use(self) -> dict[str, tuple[int, int, int]]:
        """Client -> (calls open, requests running, requests waiting), for every client with a call open."""
        return {client: (calls, self._running.get(client, 0), len(self._waiting.get(client, ())))
                for client, calls in self._calls.items()}

    @contextlib.contextmanager
    def call(self, client: str) -> Iterator[None]:
        """Count one open call of `client` (a stream or an upload) while the body runs; refuse one beyond
        the client's limit (QueueFull)."""
        if self._calls.get(client, 0) >= self.streams_per_client:
            raise QueueFull(f"this client already has {self.streams_per_client} requests or uploads open, the server's limit "
                            "per client; wait for one to finish.")
        self._calls[client] = self._calls.get(client, 0) + 1
        try:
            yield
        finally:
            self._calls[client] -= 1
            if not self._calls[client]:
                del self._calls[client]
                self._served.pop(client, None)

    @contextlib.asynccontextmanager
    async def slot(self, client: str, timeout: float | None = None) -> AsyncIterator[PoolDevice]:
        """Hold one worker slot for `client` while the body runs, yielding the slot's device; wait fairly for
        it first, at most `timeout` seconds (TimeoutError)."""
        with self.call(client):
            if self.pool.free() == 0 and self.queued >= self.queue_length:
                raise QueueFull(f"the server's queue is full ({self.queue_length} requests waiting); try again in a moment.")
            async with asyncio.timeout(timeout):
                device = await self._acquire(client)
            started = time.perf_counter()
            try:
                yield device
            finally:
                self._release(client, device, time.perf_counter() - started)

    async def _acquire(self, client: str) -> PoolDevice:
        loop = asyncio.get_running_loop()
        self.pool.wake = lambda: wake_loop(loop, self._hand_on)
        device = None if self._waiting else self.pool.take()
        if device is not None:
            self._grant(client)
            return device
        turn = loop.create_future()
        self._waiting.setdefault(client, deque()).append(turn)
        self.pool.set_waiting(self.queued)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted just as the caller went away: pass it on
                self._release(client, turn.result(), 0.0)
            else:
                self._forget(client, turn)
            raise

    def _hand_on(self) -> None:
        """Give free slots to waiting clients, least recently served first (ties: who waited first)."""
        while self._waiting:
            device = self.pool.take()
            if device is None:
                break
            client = min(self._waiting, key=lambda c: self._served.get(c, -1))
            turns = self._waiting[client]
            turn = turns.popleft()
            if not turns:
                del self._waiting[client]
            self._grant(client)
            turn.set_result(device)
        self.pool.set_waiting(self.queued)

    def _grant(self, client: str) -> None:
        """Count a worker as taken by `client` and remember when it was served (for the turn order)."""
        self.running += 1
        self._running[client] = self._running.get(client, 0) + 1
        self._served[client] = next(self._tickets)

    def _release(self, client: str, device: PoolDevice, seconds: float) -> None:
        """A worker of `client` on `device` is free again after `seconds`: hand it on."""
        self.running -= 1
        self._running[client] -= 1
        if not self._running[client]:
            del self._running[client]
        self.pool.give_back(device, seconds)
        self._hand_on()

    def _forget(self, client: str, turn: asyncio.Future) -> None:
        turns = self._waiting.get(client)
        if turns and turn in turns:
            turns.remove(turn)
            if not turns:
                del self._waiting[client]
        self.pool.set_waiting(self.queued)


def wake_loop(loop: asyncio.AbstractEventLoop, callback) -> None:
    """Run `callback` on `loop` soon, from any thread; nothing once the loop has closed (the server stopped)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass
