"""Start the gRPC feature server: standalone (`dinofeat serve`) or embedded in a client process."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat.contract.errors import DinofeatError

from ..engine.weights import cache_dir as cache_root
from .config import ServerLimits
from .device_pool import DevicePool, pick_devices
from ..engine.models import ModelRegistry, pick_device
from .result_cache import ResultCache
from .security import TokenAuthentication, check_certificate_pair, server_credentials
from .servicer import FeatureServicer
from .threads import use_threads

LOG = logging.getLogger("dinofeat.server")
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port in use must be an error, not silently shared
    ("grpc.max_receive_message_length", 8 << 20),
]


async def serving_health() -> health.aio.HealthServicer:
    """The standard gRPC health service, reporting the server and FeatureService as SERVING."""
    servicer = health.aio.HealthServicer()
    for name in ("", "dinofeat.v1.FeatureService"):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_server(host: str = "127.0.0.1", port: int = 0, device: str = "auto", insecure: bool = False,
                       weights: dict[str, str] | None = None, token_file: str | None = None, tls_cert: str | None = None,
                       tls_key: str | None = None, tls_client_ca: str | None = None, cache_dir: str | None = None,
                       cache_gb: float = 0, limits: ServerLimits = ServerLimits(), unix_socket: str | None = None,
                       watch: grpc.aio.ServerInterceptor | None = None,
                       devices: str | None = None) -> tuple[grpc.aio.Server, int, FeatureServicer]:
    """Bind and start a server; returns it with the bound port (a free one when `port` is 0).

    `weights` maps backbone names (or "*" for any) to local weight files. Beyond loopback the server
    needs a token file and a TLS certificate and key, unless `insecure` says otherwise. With
    `cache_gb` > 0, feature results are kept in `cache_dir` (default: the dinofeat cache's results/).
    It computes on `device`, or on the pool that `devices` names when given (device_pool.pick_devices), with
    `limits.workers` workers on each device; the process computes with `limits.threads_per_worker` threads
    per worker from here on (threads.py). With `unix_socket` it listens on that Unix socket instead of host:port; `watch` sees every call (local_server.IdleWatch)."""
    if bool(tls_cert) != bool(tls_key):
        raise DinofeatError("TLS needs both --tls-cert and --tls-key.")
    if tls_client_ca and not tls_cert:
        raise DinofeatError("--tls-client-ca needs TLS itself: give --tls-cert and --tls-key too.")
    if not is_loopback(host) and not insecure and not (token_file and tls_cert):
        raise DinofeatError(f"serving on {host} would expose the server beyond this machine without a token and TLS; "
                            "give --token-file, --tls-cert and --tls-key, serve on 127.0.0.1, or pass --insecure on a network you trust.")
    authentication = TokenAuthentication(token_file) if token_file else None
    interceptors = [*([watch] if watch else []), *([authentication] if authentication else [])]
    if tls_cert:
        check_certificate_pair(tls_cert, tls_key)  # else gRPC's refusal reads as a port in use
    credentials = server_credentials(tls_cert, tls_key, tls_client_ca) if tls_cert else None
    if unix_socket is None:
        check_bindable(host, port)
    chosen = pick_devices(devices) if devices is not None else [pick_device(device)]
    threads = limits.threads_per_worker(len(chosen))
    use_threads(threads)
    cache = ResultCache(cache_dir or cache_root() / "results", int(cache_gb * 1e9)) if cache_gb > 0 else None
    budget = limits.tile_budget(len(chosen))
    pool = DevicePool([ModelRegistry(d, weights, budget, allowed=limits.backbones, memory_bytes=int(limits.backbones_gb * 1e9))
                       for d in chosen], limits.workers, threads)
    servicer = FeatureServicer(pool, limits, cache=cache, authentication=authentication)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(await serving_health(), server)
    try:
        address = f"unix:{unix_socket}" if unix_socket else f"{host}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        servicer.close()
        raise DinofeatError(f"cannot listen on {host}:{port}: the port is in use or the address is not this machine's; choose another with --port.")
    await server.start()
    return server, bound, servicer


def serve(settings: dict, limits: ServerLimits = ServerLimits(), announce=print) -> None:
    """Run a server until SIGINT/SIGTERM, then stop it gracefully (running streams get 5 s).

    `settings`: start_server's keyword arguments (host, port, device, insecure, weights, token_file,
    tls_cert, tls_key, tls_client_ca, cache_dir, cache_gb, devices), as read by config.serve_settings."""

    async def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        server, bound, servicer = await start_server(**settings, limits=limits)
        protection = ", ".join(p for p, on in (("TLS", settings.get("tls_cert")), ("tokens", settings.get("token_file")),
                                               ("result cache", servicer.cache)) if on)
        announce(f"dinofeat server listening on {settings.get('host', '127.0.0.1')}:{bound} ({pool_words(servicer)}, "
                 f"queue {limits.queue_length}{'; ' + protection if protection else ''}); Ctrl+C stops it.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_tokens, servicer.authentication)
        await stop.wait()
        await server.stop(grace=5)
        servicer.close()

    asyncio.run(main())


def pool_words(servicer: FeatureServicer) -> str:
    """"device cpu; 2 workers x 1 thread", or for a pool "devices cuda:0, cuda:1; 2 workers each x 4 threads"."""
    devices, workers, threads = servicer.pool.devices, servicer.limits.workers, servicer.threads
    names = ", ".join(str(d.device) for d in devices)
    each = " each" if len(devices) > 1 else ""
    return (f"device{'s' if len(devices) > 1 else ''} {names}; {workers} worker{'s' if workers > 1 else ''}{each} x "
            f"{threads} thread{'s' if threads > 1 else ''}")


def reload_tokens(authentication: TokenAuthentication | None) -> None:
    """SIGHUP: accept the token file's tokens from now on (calls already running keep going); a file that
    cannot be read or parsed refuses every token until it is fixed and the server gets SIGHUP again."""
    if authentication is None:
        LOG.info("SIGHUP: this server has no token file to reload.")
        return
    try:
        authentication.reload()
    except DinofeatError as error:
        LOG.critical("SIGHUP: REFUSING EVERY TOKEN until %s is fixed and reloaded (kill -HUP %d): %s",
                     authentication.token_file, os.getpid(), error)
        return
    LOG.info("SIGHUP: reloaded %s.", authentication.token_file)


EMBEDDED_LIMITS = ServerLimits(workers=1, memory_gb=2)
"""The embedded server's: one worker (its client sends one request at a time) with every core's thread
(the same rule as `dinofeat serve`), and the same tile budget as a lab server's worker (2 GB = the
process's 1 GB and one request's 1 GB of tiles), so features are computed in the same tiles."""


class EmbeddedServer:
    """A server on a free loopback port in a background thread of this process (the CLI's `--no-local-server`,
    and the tests' in-process server); `settings` are more of start_server's keyword arguments."""

    def __init__(self, device: str = "auto", weights: dict[str, str] | None = None, limits: ServerLimits = EMBEDDED_LIMITS,
                 **settings):
        self.device = device
        self.weights = weights
        self.limits = limits
        self.settings = settings
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dinofeat-embedded", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_server("127.0.0.1", 0, self.device, weights=self.weights,
                                                                limits=self.limits, **self.settings), self._loop)
        try:
            self._server, port, self._servicer = future.result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            raise
        self.address = f"127.0.0.1:{port}"
        return self.address

    @property
    def servicer(self) -> FeatureServicer:
        """The running server's servicer (its store, scheduler and usage), for tests that look inside."""
        return self._servicer

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=None), self._loop).result()
        self._servicer.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def check_bindable(host: str, port: int) -> None:
    """Refuse a taken port or a foreign address in one sentence (before gRPC, which logs its own failure)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a restarted server may take its port back
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise DinofeatError(f"cannot listen on {host}:{port}: the port is in use; choose another with --port.") from None
            raise DinofeatError(f"cannot listen on {host}:{port}: {error.strerror}; give an address of this machine.") from None
