"""Fair admission of work: a bounded queue served round-robin between clients, fair by work, not by count.

As many requests run at once as the device pool has slots (workers x devices, device_pool.py); each
gets a slot on the least loaded device. The others wait in one queue per client, and a freed worker
goes to the waiting client served least recently, so a user with ten large requests waiting cannot
hold back another user's small one. Two rules keep a small request from waiting for a large one's
whole run:
- Small work (at most SMALL_WORK pixels x channels, see `estimated_work`) may run on SMALL_SLOTS slots
  of each device beyond its workers: a request of a 256 x 256 image starts at once even while large
  ones hold every worker (it shares the cores with them for a fraction of a second).
- A stream whose client stops reading is set aside (`set_aside`): its slot goes to the requests waiting,
  while its thread stays parked with its place kept; when its client reads again, it takes the next
  slot of its own device before anyone else (`take_back`).
The queue has a fixed length and each client a fixed number of open calls (streams and uploads
together); beyond either the request is refused at once (RESOURCE_EXHAUSTED) instead of piling up.
While requests wait, the pool lends no slot to running requests for their tiles, and a lent slot that
comes back wakes the scheduler to hand it on.
Lives on the event loop: every method is called from the loop's thread (the pool has its own lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dinofeat.contract.images import image_channels, spatial_shape

from .device_pool import DevicePool, PoolDevice
from .failures import Refused
from .streaming import wake_loop

if TYPE_CHECKING:
    from .jobs import Job

SMALL_WORK = 2 * 256 * 256 * 64
"""Pixels x channels of the largest small request: a 256 x 256 image and its labels in a filter bank (49-58 channels)."""
SMALL_SLOTS = 1
"""Slots of each device beyond its workers that only small work may use."""


class QueueFull(Refused):
    """No room for the request: the queue is full or the client has too many calls (streams and uploads) open."""


@dataclass(eq=False)
class Slot:
    """One request's worker slot on `device`; `held` is False while the request is set aside."""

    client: str
    device: PoolDevice
    small: bool
    held: bool = True
    started: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Turn:
    """A request waiting for a slot: `small` ones may use the slots beyond the workers."""

    future: asyncio.Future
    small: bool


class FairScheduler:
    """Round-robin between clients over the slots of `pool` (by default `workers` on the CPU), with
    `queue_length` waiting requests at most."""

    def __init__(self, workers: int, queue_length: int, streams_per_client: int, pool: DevicePool | None = None):
        self.pool = pool or DevicePool.on_cpu(workers)
        self.workers = self.pool.slots
        self.queue_length = queue_length
        self.streams_per_client = streams_per_client
        self.running = 0
        self._waiting: OrderedDict[str, deque[Turn]] = OrderedDict()
        self._returning: deque[tuple[asyncio.Future, Slot]] = deque()
        self._calls: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._tickets = itertools.count()

    @property
    def queued(self) -> int:
        """Requests waiting for a first slot (streams set aside and waiting to return are not counted)."""
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
    async def slot(self, client: str, timeout: float | None = None, work: int | None = None) -> AsyncIterator[Slot]:
        """Hold one worker slot for `client` while the body runs (it may be set aside and taken back
        meanwhile); wait fairly for it first, at most `timeout` seconds (TimeoutError). `work`: the
        request's estimated pixels x channels (None: unknown, never small)."""
        small = work is not None and work <= SMALL_WORK
        with self.call(client):
            if self.pool.free() <= 0 and self.queued >= self.queue_length:
                raise QueueFull(f"the server's queue is full ({self.queue_length} requests waiting); try again in a moment.")
            async with asyncio.timeout(timeout):
                slot = Slot(client, await self._acquire(client, small), small)
            try:
                yield slot
            finally:
                self.set_aside(slot)

    @property
    def others_wait(self) -> bool:
        """Whether any request waits for a slot."""
        return bool(self._waiting or self._returning)

    def set_aside(self, slot: Slot) -> None:
        """Free `slot`'s worker for the requests waiting (its stream stays parked); nothing if already free."""
        if slot.held:
            slot.held = False
            self._release(slot.client, slot.device, time.perf_counter() - slot.started)

    async def take_back(self, slot: Slot) -> None:
        """Hold a slot of `slot`'s device again, before any request waiting for a first one."""
        if slot.held:
            return
        device = self.pool.take(beyond=SMALL_SLOTS if slot.small else 0, on=slot.device)
        if device is None:
            turn = asyncio.get_running_loop().create_future()
            self._returning.append((turn, slot))
            self.pool.set_waiting(self.queued + len(self._returning))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release(slot.client, slot.device, 0.0)
                else:
                    self._returning.remove((turn, slot))
                raise
        else:
            self._grant(slot.client)
        slot.held, slot.started = True, time.perf_counter()

    async def _acquire(self, client: str, small: bool) -> PoolDevice:
        loop = asyncio.get_running_loop()
        self.pool.wake = lambda: wake_loop(loop, self._hand_on)
        device = None if self.others_wait and not small else self.pool.take(beyond=SMALL_SLOTS if small else 0)
        if device is not None:  # while others wait, only a small request's own slots can be free
            self._grant(client)
            return device
        turn = Turn(loop.create_future(), small)
        self._waiting.setdefault(client, deque()).append(turn)
        self.pool.set_waiting(self.queued + len(self._returning))
        try:
            return await turn.future
        except asyncio.CancelledError:
            if turn.future.done() and not turn.future.cancelled():  # granted just as the caller went away: pass it on
                self._release(client, turn.future.result(), 0.0)
            else:
                self._forget(client, turn)
            raise

    def _hand_on(self) -> None:
        """Give free slots to streams taken back first, then to waiting clients, least recently served first
        (ties: who waited first); a small request may take a slot beyond the workers."""
        for turn, slot in list(self._returning):
            device = self.pool.take(beyond=SMALL_SLOTS if slot.small else 0, on=slot.device)
            if device is not None:
                self._returning.remove((turn, slot))
                self._grant(slot.client)
                turn.set_result(device)
        while (chosen := self._next_turn()) is not None:
            client, device = chosen
            turns = self._waiting[client]
            turn = turns.popleft()
            if not turns:
                del self._waiting[client]
            self._grant(client)
            turn.future.set_result(device)
        self.pool.set_waiting(self.queued + len(self._returning))

    def _next_turn(self) -> tuple[str, PoolDevice] | None:
        """The least recently served waiting client whose next request a free slot takes, with that slot."""
        for client in sorted(self._waiting, key=lambda c: self._served.get(c, -1)):
            device = self.pool.take(beyond=SMALL_SLOTS if self._waiting[client][0].small else 0)
            if device is not None:
                return client, device
        return None

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

    def _forget(self, client: str, turn: Turn) -> None:
        turns = self._waiting.get(client)
        if turns and turn in turns:
            turns.remove(turn)
            if not turns:
                del self._waiting[client]
        self.pool.set_waiting(self.queued + len(self._returning))


def estimated_work(job: Job) -> int:
    """Pixels of the images a request computes on (its label images too) x the channels of its feature set."""
    channels = len(job.fset.channel_names(image_channels(job.images[0]), job.computation))
    return sum(int(np.prod(spatial_shape(image))) for image in job.images) * channels
