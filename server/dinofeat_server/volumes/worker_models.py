"""One loaded model per worker process: a cache of `ModelRegistry`s keyed by device and weights.

Why a per-process cache and not a `distributed.WorkerPlugin`: a plugin must be registered with the
scheduler before tasks run and knows nothing of which backbone or weights a run needs, while the key
(device, weights mapping) travels in every task anyway. The first task of a run on a worker loads
the backbone (the registry loads each backbone once, under its lock, so threads of one worker share
it); every later task on that worker, of this run or the next, finds it here. The same code serves
the in-process run (no Dask) and a notebook's local scheduler. A worker that dies takes its cache
with it; its replacement loads the model again on its first task.
"""

from __future__ import annotations

import threading

from ..engine.models import ModelRegistry, pick_device

_registries: dict[tuple[str, tuple[tuple[str, str], ...]], ModelRegistry] = {}
_lock = threading.Lock()


def worker_models(device: str = "auto", weights: dict[str, str] | None = None) -> ModelRegistry:
    """The registry of this process for (`device`, `weights`): backbone name -> local weights file ("*": any
    backbone); backbones without an entry come from $DINOFEAT_WEIGHTS on the worker, or its cached download."""
    key = (device, tuple(sorted((weights or {}).items())))
    with _lock:
        if key not in _registries:
            _registries[key] = ModelRegistry(pick_device(device), weights)
        return _registries[key]


def where() -> str:
    """This process as a user reads it: "worker tcp://HOST:PORT" inside a Dask worker, else "this machine"."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return "this machine"
