"""The one module of the client that imports the server part (dinofeat[server]): the commands that run the
server's code in this process. An embedded server (no --server, no local server), `dinofeat serve`, the volume
commands (OME-Zarr, Dask) and `dinofeat weights random`. Each import happens when called, so the client loads
without torch; where the server part is missing, the command says so in one sentence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from dinofeat.contract.errors import DinofeatError


@contextlib.contextmanager
def server_part_needed(sentence: str) -> Iterator[None]:
    """Turn a missing server part (torch, scikit-learn, the volumes extra) into `sentence`."""
    try:
        yield
    except ImportError:
        raise DinofeatError(sentence) from None


@contextlib.contextmanager
def embedded_server(device: str, weights: dict[str, str] | None) -> Iterator[str]:
    """A server in this process for one command; yields its address (see dinofeat_server.service.server)."""
    with server_part_needed("no --server was given and the server part is not installed here; "
                            "pass --server ADDRESS or install dinofeat[server]."):
        from dinofeat_server.service.server import EmbeddedServer
    with EmbeddedServer(device, weights) as address:
        yield address


def serve(config: str | None, flags: dict, limit_flags: dict) -> None:
    """`dinofeat serve`: the settings of the config file with the flags over them; serves until stopped."""
    with server_part_needed("serving needs the server part; install dinofeat[server]."):
        from dinofeat_server.service.config import serve_settings
        from dinofeat_server.service.server import serve as serve_until_stopped
    settings, limits = serve_settings(config, flags, limit_flags)
    serve_until_stopped(settings, limits)


def volumes() -> ModuleType:
    """The volume functions (dinofeat_server.volumes: OME-Zarr in and out, Dask tasks)."""
    with server_part_needed("OME-Zarr outputs and --dask need dinofeat[server,volumes] here (torch, dask, distributed, "
                            "zarr, ome-zarr)."):
        import dinofeat_server.volumes as volume_functions
    return volume_functions


def write_random_checkpoint(backbone: str, path: Path, seed: int) -> int:
    """A seeded random checkpoint of `backbone` in the official layout written to `path`; its parameter count."""
    with server_part_needed("writing a checkpoint needs torch, which the server part brings: install dinofeat[server]."):
        from dinofeat_server.engine.weights import check_backbone, save_random_checkpoint
    check_backbone(backbone)
    return save_random_checkpoint(backbone, path, seed)
