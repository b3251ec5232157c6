"""The server's settings: one TOML file (`dinofeat serve --config FILE`) whose values flags override.

    [server]                      [limits]
    host = "0.0.0.0"              max_pixels = 268435456      # samples per image (Z*Y*X*C)
    port = 50051                  max_channels = 2048         # feature channels per result
    device = "cuda"               max_upload_mb = 2048        # bytes of one uploaded image
    # devices = "all"             max_streams_per_client = 4  # concurrent streams of one client
    token_file = "tokens.txt"     queue_length = 64           # requests waiting for a worker
    tls_cert = "server.pem"       workers = 2                 # compute slots on each device
    tls_key = "server.key"        threads = 4                 # threads of each worker (default: cores / all workers)
    cache_dir = "/scratch/cache"  max_request_seconds = 3600  # longest a request may run
    cache_gb = 50                 image_store_gb = 8          # uploaded images held in memory
                                  memory_gb = 3               # the server's memory target (tiles fit it)
                                  max_output_gb = 256         # bytes of one result (checked before work)
                                  max_training_gb = 4         # classes x labelled pixels x trees x 8 bytes
                                  stall_seconds = 60          # a client that stops reading or sending is cut off
                                  client_upload_gb = 2        # uploads in flight of one client
                                  models_gb = 2               # uploaded model files held (unpacked size)
                                  backbones = ["dinov2_vits14", "dinov2_vitb14"]  # may load (default: all eight)
                                  backbones_gb = 6            # loaded backbones per device (least recently used go)

Devices and workers: `device` is one device (auto, cpu, cuda[:N]); `devices` makes a pool of several
("all": every CUDA GPU, else the CPU; "cuda:0,cuda:1"; "cpu"), with one loaded model per (backbone,
device). Give one of the two (a flag replaces the file's either). A worker is one compute slot on one
device: `workers` slots on each device, so workers x devices requests run at once, and one device
behaves exactly as a server without a pool. Each worker computes with `threads` threads, by default
the cores shared out between all workers (cores // (workers x devices), at least 1). A running request
may borrow idle workers for its tiles or slices while no other request waits (device_pool.py).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from dinofeat.contract.errors import DinofeatError

from ..engine.weights import BACKBONES


BASE_BYTES = 1 << 30
"""Resident memory of a server before any tile: Python, torch, gRPC, a loaded ViT-S/B, images and strips."""
MIN_TILE_BUDGET = 128 << 20


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the system has one (taskset, cpusets),
    else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """Threads per worker when none are configured: the cores shared out, so workers x threads <= cores
    (at least one thread each)."""
    return max(available_cores() // workers, 1)


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts; requests beyond it get INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""

    max_pixels: int = 1 << 30
    max_channels: int = 4096
    max_upload_mb: float = 4096
    max_streams_per_client: int = 8
    queue_length: int = 64
    workers: int = 2
    """Compute slots on each device (workers x devices requests run at once)."""
    threads: int | None = None
    """Threads of each worker: torch's intra-op threads, BLAS/OpenMP pools and the forest's jobs
    (None: default_threads(workers x devices), so that all workers' threads <= the cores)."""
    max_request_seconds: float = 6 * 3600
    image_store_gb: float = 4
    memory_gb: float = 3
    max_output_gb: float = 256
    max_training_gb: float = 4
    stall_seconds: float = 60
    """A stream whose client reads nothing, or an upload that sends nothing, for this long ends and frees its worker."""
    client_upload_gb: float = 2
    """Bytes of one client's uploads in flight (images and model files); all clients' together count
    against image_store_gb."""
    models_gb: float = 2
    """Uploaded model files held, by their unpacked size (least recently used go first)."""
    backbones: tuple[str, ...] = BACKBONES
    """The DINOv2 backbones this server may download and load (a list in the file, names separated by commas as a flag)."""
    backbones_gb: float = 6
    """Memory for loaded backbones on each device: the least recently used that no request holds go first."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbones", checked_backbones(self.backbones))
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "threads" and value is None or field.name == "backbones":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise DinofeatError(f"the limit {field.name} must be a positive number, not {value!r}.")

    @property
    def client_upload_bytes(self) -> int:
        return int(self.client_upload_gb * 1e9)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    def threads_per_worker(self, devices: int) -> int:
        """The threads each worker computes with on `devices` devices: `threads`, or the cores shared out
        between all workers (workers x devices)."""
        return self.threads or default_threads(self.workers * devices)

    def tile_budget(self, devices: int) -> int:
        """Memory the tiles of one request may use: the memory target less the process's base, shared by
        all workers (workers x devices; each computes one request or one lent tile at a time)."""
        return max(int((self.memory_gb * (1 << 30) - BASE_BYTES) / (self.workers * devices)), MIN_TILE_BUDGET)


def checked_backbones(names: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The backbones setting as a tuple of known names ("a,b" from a flag, a list from the file); else one sentence."""
    chosen = tuple(name.strip() for name in names.split(",")) if isinstance(names, str) else tuple(names)
    for name in chosen or ("",):
        if name not in BACKBONES:
            raise DinofeatError(f"the limit backbones lists {name!r}, which is no backbone dinofeat knows; choose from {', '.join(BACKBONES)}.")
    return chosen


SERVER_KEYS = {"host": str, "port": int, "device": str, "devices": str, "insecure": bool, "token_file": str, "tls_cert": str,
               "tls_key": str, "tls_client_ca": str, "cache_dir": str, "cache_gb": float, "weights": dict}
"""Keys of the [server] table and their types (weights: backbone name -> file; device or devices, not both)."""
LIMIT_KEYS = {field.name: float if field.type == "float" else int for field in fields(ServerLimits)} | {"backbones": list}


def read_config(path: str | Path) -> tuple[dict, ServerLimits]:
    """The [server] settings and [limits] of a TOML file; unknown tables, keys or types refused in one sentence."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DinofeatError(f"cannot read the server configuration {path}: no such file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DinofeatError(f"the server configuration {path} is not valid TOML ({error}); fix it or leave out --config.") from None
    unknown = set(document) - {"server", "limits"}
    if unknown:
        raise DinofeatError(f"{path}: unknown table [{sorted(unknown)[0]}]; the configuration has [server] and [limits].")
    settings = checked_table(path, "server", document.get("server", {}), SERVER_KEYS)
    if "device" in settings and "devices" in settings:
        raise DinofeatError(f"{path}: [server] has both device and devices; keep device for one device or devices for a pool.")
    limits = checked_table(path, "limits", document.get("limits", {}), LIMIT_KEYS)
    return settings, ServerLimits(**limits)


def checked_table(path: Path, name: str, table: dict, types: dict[str, type]) -> dict:
    for key, value in table.items():
        if key not in types:
            raise DinofeatError(f"{path}: [{name}] has no setting {key!r}; known: {', '.join(types)}.")
        wanted = types[key]
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) if wanted is float else isinstance(value, wanted)
        if not fits or (wanted is int and isinstance(value, bool)):
            raise DinofeatError(f"{path}: [{name}] {key} must be {wanted.__name__}, not {value!r}.")
    return dict(table)


SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 50051, "device": "auto", "insecure": False, "cache_gb": 8.0}


def serve_settings(config: str | Path | None, flags: dict, limit_flags: dict) -> tuple[dict, ServerLimits]:
    """start_server's settings and the limits: built-in defaults, then the config file, then the flags
    given on the command line (None means not given). Weights from both are merged, flags winning; a
    --device or --devices flag replaces the file's device or devices, and giving both flags is refused."""
    settings, limits = read_config(config) if config else ({}, ServerLimits())
    given = {k: v for k, v in flags.items() if v is not None}
    if "device" in given and "devices" in given:
        raise DinofeatError("give --device (one device) or --devices (a pool of them), not both.")
    if "device" in given or "devices" in given:
        settings = {k: v for k, v in settings.items() if k not in ("device", "devices")}
    weights = {**settings.get("weights", {}), **(given.pop("weights", None) or {})}
    merged = {**SERVE_DEFAULTS, **settings, **given, "weights": weights}
    if "devices" in merged:
        del merged["device"]
    chosen = {**{f.name: getattr(limits, f.name) for f in fields(ServerLimits)},
              **{k: v for k, v in limit_flags.items() if v is not None}}
    return merged, ServerLimits(**chosen)
