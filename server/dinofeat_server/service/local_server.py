"""A per-user local server: one user's server on a Unix socket that exits when idle.

The client side (clients/dinofeat_client/local_server.py) finds or starts it as `python -m
dinofeat_server.service.local_server SOCKET ...` (`main`); this side writes its info file, serves with the embedded
server's limits, counts open calls (IdleWatch) and leaves when idle, deciding so under the clients' start lock so
that no client picks a server that is about to exit. The files and the lock are dinofeat.contract.local_server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from dinofeat import __version__
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.local_server import (
    IDLE_MINUTES,
    SERVER_MODULE,
    LocalServer,
    installation,
    locked,
    remove_own_info,
    write_info,
)

from .server import EMBEDDED_LIMITS, LOG, start_server
from .servicer import FeatureServicer


class IdleWatch(grpc.aio.ServerInterceptor):
    """Counts the calls open on a server and when the last one ended, so that a local server can exit when idle."""

    def __init__(self) -> None:
        self.open = 0
        self.since = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last call ended; 0 while a call is open."""
        return 0.0 if self.open else time.monotonic() - self.since

    def _enter(self) -> None:
        self.open += 1

    def _leave(self) -> None:
        self.open -= 1
        self.since = time.monotonic()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kind = next(name for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, name))
        return handler._replace(**{kind: self._counted(getattr(handler, kind))})

    def _counted(self, behaviour):
        """`behaviour` (a coroutine or async-generator method handler) counted as open while it runs."""
        if inspect.isasyncgenfunction(behaviour):
            async def streamed(request, context):
                self._enter()
                try:
                    async for message in behaviour(request, context):
                        yield message
                finally:
                    self._leave()
            return streamed

        async def called(request, context):
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()
        return called


REPLACED_IDLE_S = 5.0
"""A local server whose socket was taken by a newer one exits once no call has been open for this long."""


def serve_local(socket_path: str, lock_path: str, device: str = "auto", weights: dict[str, str] | None = None,
                idle_s: float = 900.0) -> None:
    """Serve one user on a Unix socket (in a private folder: no token) with the embedded server's limits, until
    SIGINT/SIGTERM or `idle_s` seconds without a call; the socket is removed on the way out.

    The idle exit is decided under the client's start lock (`lock_path`, fcntl), and the socket removed before the
    lock is released, so a client that found this server answering keeps it (its health check is a call) and one
    that comes later starts a new one (clients/dinofeat_client/local_server.py)."""

    async def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        watch = IdleWatch()
        server, servicer, mine = await start_local(socket_path, device, weights, watch)
        LOG.info("local server listening on unix:%s (device %s); exits after %.0f s idle", socket_path, device, idle_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await _until_done(watch, stop, idle_s, socket_path, mine, lock_path)
        finally:
            await stop_local(server, servicer, socket_path, mine)

    asyncio.run(main())


async def start_local(socket_path: str, device: str, weights: dict[str, str] | None,
                      watch: IdleWatch) -> tuple[grpc.aio.Server, FeatureServicer, tuple]:
    """A server listening on `socket_path`, with the identity of its socket file.

    gRPC removes the path it bound when the server stops, whatever file is there by then, which would be
    a successor's socket. So the server binds a name of its own in the same folder and moves that socket
    to `socket_path` (atomically, replacing an older server's); what gRPC removes later is the private
    name, already gone."""
    bound = str(Path(socket_path).with_name(f".{os.getpid()}.bind"))
    server, _, servicer = await start_server(device=device, weights=weights, limits=EMBEDDED_LIMITS, unix_socket=bound, watch=watch)
    os.replace(bound, socket_path)
    return server, servicer, _file_identity(socket_path)


async def stop_local(server: grpc.aio.Server, servicer: FeatureServicer, socket_path: str, mine: tuple) -> None:
    """Stop a local server: its socket file goes only if it is still its own (a newer server may have taken the path)."""
    _remove_socket(socket_path, mine)
    await server.stop(grace=5)
    servicer.close()


async def _until_done(watch: IdleWatch, stop: asyncio.Event, idle_s: float, socket_path: str, mine: tuple, lock_path: str) -> None:
    """Return on SIGINT/SIGTERM (`stop`), once a newer server took the socket and no call was open for 5 s, or
    after `idle_s` without a call (checked every tenth of it, at most every 30 s)."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(max(idle_s / 10, 0.1), 30.0))
        if stop.is_set():
            return
        if watch.idle_s() >= min(idle_s, REPLACED_IDLE_S) and _file_identity(socket_path) != mine:
            LOG.info("a newer server took this socket: exiting")
            return
        if watch.idle_s() >= idle_s and await asyncio.to_thread(_leave_if_idle, watch, idle_s, socket_path, mine, lock_path):
            LOG.info("no call for %.0f s: exiting", idle_s)
            return


def _leave_if_idle(watch: IdleWatch, idle_s: float, socket_path: str, mine: tuple, lock_path: str) -> bool:
    """Under the clients' start lock: whether the server is still idle; if so its socket is removed first. A client
    holding the lock is about to call (or start) a server for this key: not idle then."""
    try:
        with locked(Path(lock_path), timeout_s=0.0):  # the clients' own lock helper: one try, no wait
            if watch.idle_s() < idle_s:
                return False
            _remove_socket(socket_path, mine)
            return True
    except TimeoutError:
        return False


def _file_identity(path: str) -> tuple[int, int, int] | None:
    """Device, inode and change time of a file (None when absent): a socket made anew after this one was removed
    differs even where the file system hands out the same inode again."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_ctime_ns


def _remove_socket(socket_path: str, mine: tuple) -> None:
    """Remove the socket file if it is still this server's (a client replaces it to start a server of newer code)."""
    with contextlib.suppress(OSError):
        if _file_identity(socket_path) == mine:
            os.unlink(socket_path)


def main(argv: list[str] | None = None) -> int:
    """The started server process: write its info file, serve until idle or stopped, remove the file; exit status
    1 with `dinofeat: error: SENTENCE` in its log when it cannot serve (the starting command repeats the sentence)."""
    parser = argparse.ArgumentParser(prog=f"python -m {SERVER_MODULE}")
    parser.add_argument("socket")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH")
    parser.add_argument("--idle-minutes", type=float, default=IDLE_MINUTES)
    parser.add_argument("--code", type=int, default=0, help="the starting command's code stamp")
    args = parser.parse_args(argv)
    os.umask(0o077)
    files = LocalServer.of_socket(Path(args.socket))
    weights = dict(entry.split("=", 1) for entry in args.weights) or None
    write_info(files, version=__version__, installation=installation(), device=args.device, weights=weights,
               idle_minutes=args.idle_minutes, code=args.code)
    try:
        serve_local(str(files.socket), str(files.lock), args.device, weights, args.idle_minutes * 60)
    except DinofeatError as error:
        print(f"dinofeat: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        remove_own_info(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
