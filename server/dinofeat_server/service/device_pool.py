"""The server's compute slots: `workers` on each of its devices, with one loaded model per (backbone, device).

A worker is one compute slot on one device, computing with its threads (threads.py). `dinofeat serve
--devices all` (every CUDA GPU, else the CPU), `--devices cuda:0,cuda:1` or `--devices cpu` makes a pool;
`--device X` is a pool of the one device X. `workers` counts slots per device, so one device behaves as
before the pool existed; the pool has workers x devices slots.

The fair scheduler grants each request one slot, on the least loaded device. While no other request
waits, a running request also borrows idle slots, one tile at a time (`LentWorkers`, the engine's
`SpareWorkers`) or one slice of a volume at a time (`WorkerModels.lend`, used by blocks.WorkerFeatures.blocks),
so one large request uses every device and a newly arriving request waits at most one tile or slice
for its worker. The counts here are shared by the event loop (request slots) and the engine
threads (lent slots), so they sit behind one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.contract.errors import DinofeatError

from ..engine.deep import DeepExtractor
from ..engine.models import ModelRegistry
from .threads import use_threads

Result = TypeVar("Result")
DEVICES_HELP = "all (every CUDA GPU, else the CPU), cpu, or CUDA GPUs separated by commas such as cuda:0,cuda:1"


def pick_devices(text: str) -> list[torch.device]:
    """The devices that `--devices` names (see DEVICES_HELP); anything else is refused in one sentence."""
    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", index) for index in range(count)] or [torch.device("cpu")]
    if "" in names:
        raise DinofeatError(f"--devices {text!r} lists an empty name; give {DEVICES_HELP}.")
    devices = [one_device(name) for name in names]
    if len({d.type for d in devices}) > 1:
        raise DinofeatError(f"--devices {text!r} mixes the CPU with GPUs, whose tiles would differ in precision; "
                            "give GPUs only, or cpu with more --workers.")
    for device in devices:
        if devices.count(device) > 1:
            raise DinofeatError(f"--devices lists {device} twice; list each device once and set its workers with --workers.")
    return devices


def one_device(name: str) -> torch.device:
    """One device of a `--devices` list: cpu, or a CUDA GPU that this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DinofeatError(f"unknown device {name!r} in --devices; give {DEVICES_HELP}.")
    if device.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise DinofeatError(f"device {name!r} was asked for but this machine has no usable CUDA GPU; use --devices cpu.")
    index = device.index or 0
    if index >= count:
        raise DinofeatError(f"device {name!r} is not on this machine, which has {count} CUDA GPU{'s' if count > 1 else ''} "
                            f"(cuda:0 to cuda:{count - 1}); use --devices all.")
    return torch.device("cuda", index)


@dataclass(eq=False)
class PoolDevice:
    """One device of the pool: its models, its slots and what they have done since the server started."""

    registry: ModelRegistry
    workers: int
    busy: int = 0
    tiles: int = 0
    lent_tiles: int = 0
    busy_seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.registry.device


class DevicePool:
    """`workers` slots on each device of `registries`; slots go to the least loaded device. Thread-safe."""

    def __init__(self, registries: list[ModelRegistry], workers: int, threads: int = 1):
        self.devices = [PoolDevice(registry, workers) for registry in registries]
        self.slots = workers * len(registries)
        self.waiting = 0
        """Requests waiting for a slot (set by the scheduler): while there are any, nothing is lent."""
        self.wake: Callable[[], None] = lambda: None
        """Called (from any thread) when a lent slot comes back while requests wait: the scheduler hands it on."""
        self.lenders = ThreadPoolExecutor(max_workers=max(self.slots - 1, 1), thread_name_prefix="dinofeat-lent",
                                          initializer=use_threads, initargs=(threads,))
        self._lock = threading.Lock()

    @classmethod
    def on_cpu(cls, workers: int) -> DevicePool:
        """A pool of `workers` slots on the CPU (models loaded from the default weights)."""
        return cls([ModelRegistry(torch.device("cpu"))], workers)

    def free(self) -> int:
        with self._lock:
            return sum(d.workers - d.busy for d in self.devices)

    def set_waiting(self, count: int) -> None:
        with self._lock:
            self.waiting = count

    def take(self, lend: bool = False, beyond: int = 0, on: PoolDevice | None = None) -> PoolDevice | None:
        """A free slot on the least loaded device (busy share, then order), or None when all are busy or,
        to `lend`, when a request waits. `beyond`: slots a device may run over its workers (small work,
        scheduler.py); `on`: that device only."""
        with self._lock:
            if lend and self.waiting:
                return None
            free = [d for d in self.devices if d.busy < d.workers + beyond and (on is None or d is on)]
            if not free:
                return None
            chosen = min(free, key=lambda d: d.busy / d.workers)
            chosen.busy += 1
            return chosen

    def give_back(self, device: PoolDevice, seconds: float) -> None:
        """A slot of `device` is free again after `seconds`; when requests wait, the scheduler is woken to hand it on."""
        with self._lock:
            device.busy -= 1
            device.busy_seconds += seconds
            waiting = self.waiting
        if waiting:
            self.wake()

    def count_tile(self, device: PoolDevice, lent: bool) -> None:
        """One tile computed on `device`; `lent`: for a request running on another worker."""
        with self._lock:
            device.tiles += 1
            device.lent_tiles += lent

    def lend(self, work: Callable[[PoolDevice], Result]) -> Future[Result] | None:
        """Start `work(device)` on an idle slot's thread, or None at once when no slot is idle or a request
        waits; the slot goes back when `work` ends."""
        device = self.take(lend=True)
        if device is None:
            return None
        try:
            return self.lenders.submit(self._run_lent, device, work)
        except RuntimeError:  # the server is stopping
            self.give_back(device, 0.0)
            return None

    def _run_lent(self, device: PoolDevice, work: Callable[[PoolDevice], Result]) -> Result:
        started = time.perf_counter()
        try:
            return work(device)
        finally:
            self.give_back(device, time.perf_counter() - started)

    def models(self, device: PoolDevice) -> WorkerModels:
        """The models of a request computing on a slot of `device`."""
        return WorkerModels(self, device)

    def loaded(self) -> list[str]:
        """Backbones loaded on any device."""
        return sorted({name for d in self.devices for name in d.registry.loaded()})

    def report(self) -> list[pb.DeviceUse]:
        """One row per device for the status reply."""
        with self._lock:
            rows = [(d.device, d.workers, d.busy, d.tiles, d.lent_tiles, d.busy_seconds, d.registry) for d in self.devices]
        return [pb.DeviceUse(device=str(device), workers=workers, busy=busy, tiles=tiles, lent_tiles=lent, busy_seconds=seconds,
                             loaded_models=registry.loaded(), **device_memory(device))
                for device, workers, busy, tiles, lent, seconds, registry in rows]

    def close(self) -> None:
        self.lenders.shutdown(wait=False, cancel_futures=True)


def device_memory(device: torch.device) -> dict[str, int]:
    """A GPU's memory allocated by this process and its total, for status (nothing on a CPU)."""
    if device.type != "cuda":
        return {}
    return {"memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "memory_total_bytes": torch.cuda.get_device_properties(device).total_memory}


class WorkerModels:
    """The Models of one request on one slot: its device's extractors, which borrow idle slots for tiles.

    Each backbone it uses is held in the registry (not evicted) until `released` ends the request.
    `lent`: the slot itself is lent to a request running elsewhere (it lends nothing further, and its
    tiles count as lent)."""

    def __init__(self, pool: DevicePool, device: PoolDevice, lent: bool = False):
        self.pool, self.device, self.lent = pool, device, lent
        self.held: set[str] = set()

    def extractor(self, backbone: str) -> DeepExtractor:
        return self.held_extractor(backbone).lending(LentWorkers(self, backbone))

    def held_extractor(self, backbone: str) -> DeepExtractor:
        """The device's extractor of `backbone`, held for this request from before it loads."""
        registry = self.device.registry
        if backbone not in self.held:
            registry.check_allowed(backbone)
            registry.hold(backbone)
            self.held.add(backbone)
        return registry.extractor(backbone)

    def release(self) -> None:
        """The request ended: its models may be evicted again."""
        for backbone in self.held:
            self.device.registry.release(backbone)
        self.held.clear()

    def released(self, messages: Iterator[Result]) -> Iterator[Result]:
        """`messages` of a request computing with these models, which are released when it ends."""
        try:
            yield from messages
        finally:
            self.release()

    def weights_sha256(self, backbone: str) -> str:
        self.held_extractor(backbone)
        return self.device.registry.weights_sha256(backbone)

    @property
    def budget_bytes(self) -> int:
        """Memory one worker's tiles (or one lent slice's features) may use."""
        return self.device.registry.budget_bytes

    @property
    def spare_count(self) -> int:
        """Workers this request could borrow at most (0 for a lent slot)."""
        return 0 if self.lent else self.pool.slots - 1

    def lend(self, work: Callable[[torch.device, WorkerModels], Result]) -> Future[Result] | None:
        """Start `work(device, models)` on an idle slot (its device and models), or None at once."""
        if self.lent:
            return None
        return self.pool.lend(lambda device: lent_work(work, WorkerModels(self.pool, device, lent=True)))


def lent_work(work: Callable[[torch.device, WorkerModels], Result], models: WorkerModels) -> Result:
    """`work` on a lent slot with that slot's models, released when it ends (one tile or slice)."""
    try:
        return work(models.device.device, models)
    finally:
        models.release()


class LentWorkers:
    """The engine's SpareWorkers for one request's backbone: idle slots of the pool, lent for one tile each."""

    def __init__(self, models: WorkerModels, backbone: str):
        self.models, self.backbone = models, backbone
        self.count = models.spare_count

    def lend(self, work: Callable[[DeepExtractor], torch.Tensor]) -> Future[torch.Tensor] | None:
        """Start `work` on an idle slot with that slot's device's extractor, or None at once."""
        return self.models.lend(lambda device, models: self._tile(models, work))

    def _tile(self, models: WorkerModels, work: Callable[[DeepExtractor], torch.Tensor]) -> torch.Tensor:
        result = work(models.held_extractor(self.backbone))
        models.pool.count_tile(models.device, lent=True)
        return result

    def computed_here(self) -> None:
        self.models.pool.count_tile(self.models.device, lent=self.models.lent)
