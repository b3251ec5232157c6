"""Commands about servers: serve, status, sets, and this user's local servers."""

from __future__ import annotations

import argparse

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.feature_sets import SETS

from .. import local_server, server_part
from .common import connect, weights_map
from .progress import ProgressBars
from .options import SharedOptions


def command_local(args: argparse.Namespace, bars: ProgressBars) -> None:
    """`dinofeat local [status|stop]`: list or stop this user's local servers (local_server.py)."""
    servers = local_server.running(local_server.private_folder(local_server.runtime_folder()))
    if not servers:
        print("no local dinofeat server is running for this user.")
    for info in servers:
        if args.action == "stop":
            local_server.stop(info)
            print(f"stopped the local dinofeat server (pid {info['pid']}).")
        else:
            print(local_server.describe(info))


def command_sets(args: argparse.Namespace, bars: ProgressBars) -> None:
    """The sets --server offers; without --server this dinofeat's own list (feature_sets.py): no server, no torch."""
    if args.server:
        with connect(args) as client:
            listed = [(s.name, s.channels_per_image_channel, s.description) for s in client.feature_sets()]
    else:
        listed = [(s.name, s.channels, s.description) for s in SETS]
    for name, channels, description in listed:
        print(f"{name:<12} {channels:>4} channels  {description}")
    print_backbones()


DINOV2_BACKBONES = tuple(f"dinov2_vit{size}14{registers}" for size in "sblg" for registers in ("", "_reg"))
DINOV3_BACKBONES = ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16")
"""The backbones of the deep sets, as the server's engine/weights.py BACKBONES (tests/test_dinov3_clients.py checks)."""


def print_backbones() -> None:
    """The --backbone choices of the deep sets and where each family's weights come from."""
    print("\nbackbones of the deep sets (--backbone; a server may offer fewer, see its backbones setting):")
    print(f"  DINOv2  {', '.join(DINOV2_BACKBONES)}: official weights, downloaded once (default dinov2_vits14)")
    named = [name + (" (GPU servers only)" if name == "dinov3_vit7b16" else "") for name in DINOV3_BACKBONES]
    print(f"  DINOv3  {', '.join(named)}: weights under the DINOv3 License, "
          "which you accept with Meta; pass the file with --weights (README, DINOv3 backbones)")


def command_status(args: argparse.Namespace, bars: ProgressBars) -> None:
    if not args.server:
        raise DinofeatError("dinofeat status reports on a running server; pass --server HOST:PORT.")
    with connect(args) as client:
        status = client.status()
    memory = (f"{status.device_memory_allocated_bytes / 1e9:.2f} of {status.device_memory_total_bytes / 1e9:.1f} GB"
              if status.device_memory_total_bytes else "n/a (CPU)")
    cache = (f"{status.cache_bytes / 1e9:.2f} of {status.cache_budget_bytes / 1e9:.1f} GB" if status.cache_budget_bytes else "off")
    print(f"dinofeat server {status.version} on {status.device}\n"
          f"  requests          {status.running} running on {status.workers} workers, {status.queued} waiting "
          f"(queue {status.queue_length}); {status.finished} finished, {status.cancelled} cancelled, {status.refused} refused\n"
          f"  threads           {status.threads_per_worker} per worker (torch, BLAS/OpenMP, forest)\n"
          f"  loaded models     {', '.join(status.loaded_models) or 'none'}\n"
          f"  device memory     {memory}\n"
          f"  result cache      {cache}\n"
          f"  images held       {status.images_held} ({status.image_bytes / 1e6:.1f} MB); uploads in flight "
          f"{status.upload_bytes / 1e6:.1f} MB; model files {status.model_bytes / 1e6:.1f} MB")
    print_devices(status.devices)
    if status.clients:
        print(f"  {'client':<20} {'open':>5} {'running':>8} {'waiting':>8} {'uploading':>10} {'finished':>9} {'cancelled':>10} "
              f"{'refused':>8} {'stalled':>8} {'sent':>10}")
        for row in status.clients:
            print(f"  {row.client:<20} {row.open_calls:>5} {row.running:>8} {row.queued:>8} {row.upload_bytes / 1e6:>8.1f}MB "
                  f"{row.finished:>9} {row.cancelled:>10} {row.refused:>8} {row.stalled:>8} {row.bytes_sent / 1e6:>8.1f}MB")


def print_devices(devices) -> None:
    """The status's per-device table: workers, busy now, tiles computed (lent: for a request on another
    worker), busy time, GPU memory and loaded models. Nothing for a server older than the device pool."""
    if not devices:
        return
    print(f"  {'device':<10} {'workers':>7} {'busy':>5} {'tiles':>7} {'lent':>6} {'busy time':>10} {'GPU memory':>16}  models")
    for row in devices:
        memory = f"{row.memory_allocated_bytes / 1e9:.2f}/{row.memory_total_bytes / 1e9:.1f} GB" if row.memory_total_bytes else "-"
        print(f"  {row.device:<10} {row.workers:>7} {row.busy:>5} {row.tiles:>7} {row.lent_tiles:>6} {row.busy_seconds:>8.1f} s "
              f"{memory:>16}  {', '.join(row.loaded_models) or '-'}")


def command_serve(args: argparse.Namespace, bars: ProgressBars) -> None:
    given = vars(args)
    flags = {key: given[key] for key in SERVE_FLAGS}
    flags["weights"] = weights_map(args.weights) if args.weights else None
    flags["insecure"] = True if args.insecure else None
    server_part.serve(args.config, flags, {key: given[key] for key in LIMIT_FLAGS})


SERVE_FLAGS = ("host", "port", "device", "devices", "token_file", "tls_cert", "tls_key", "tls_client_ca", "cache_dir", "cache_gb")


LIMIT_FLAGS = {"max_pixels": (int, "samples per image, Z*Y*X*channels"), "max_channels": (int, "feature channels per result"),
               "max_upload_mb": (float, "size of one uploaded image in MiB"),
               "max_streams_per_client": (int, "concurrent requests of one client"),
               "queue_length": (int, "requests waiting for a worker before new ones are refused"),
               "workers": (int, "compute slots on each device: workers x devices requests run at once"),
               "threads": (int, "threads of each worker: torch, BLAS/OpenMP, the forest "
                                "(default: cores / (workers x devices))"),
               "max_request_seconds": (float, "longest a request may run"),
               "image_store_gb": (float, "memory for uploaded images"),
               "memory_gb": (float, "memory target: tiles of deep features are sized to fit it"),
               "max_output_gb": (float, "size of one result, checked before any work"),
               "max_training_gb": (float, "size of a classifier's trees: classes x labelled pixels x trees x 8 bytes"),
               "stall_seconds": (float, "a client that reads or sends nothing for this long is cut off, freeing its worker"),
               "client_upload_gb": (float, "uploads in flight of one client (images and model files)"),
               "models_gb": (float, "uploaded model files held in memory"),
               "backbones": (str, "DINOv2 and DINOv3 backbones this server may load, separated by commas (default: all of them)"),
               "backbones_gb": (float, "loaded backbones on each device; the least recently used go first")}


def add_parsers(commands: argparse._SubParsersAction, shared: SharedOptions) -> None:
    """The commands about servers: sets, local, status, serve."""
    commands.add_parser("sets", parents=[shared.remote],
                        help="list the feature sets the server offers").set_defaults(run=command_sets)
    p = commands.add_parser("local", help="this user's local servers (started by commands without --server): status or stop")
    p.set_defaults(run=command_local)
    p.add_argument("action", nargs="?", choices=("status", "stop"), default="status", help="list them (default) or stop them")
    commands.add_parser("status", parents=[shared.remote],
                        help="what a server is doing: requests, models, memory, cache").set_defaults(
        run=command_status)

    p = commands.add_parser("serve", help="run a feature server")
    p.set_defaults(run=command_serve)
    p.add_argument("--config", help="server configuration (TOML with [server] and [limits]); flags override it")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default 50051)")
    p.add_argument("--device", help="one device: auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--devices", help="a pool instead of --device, --workers on each: all (every CUDA GPU, else the CPU), "
                   "cpu, or cuda:0,cuda:1")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without token or TLS")
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]PATH",
                   help="local weights for a backbone (repeatable); a bare PATH serves any backbone; anyup=PATH: AnyUp's weights")
    p.add_argument("--token-file", help="accepted access tokens, one per line; clients send one as a bearer token")
    p.add_argument("--tls-cert", help="server TLS certificate (PEM)")
    p.add_argument("--tls-key", help="server TLS key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--cache-dir", help="where recent feature results are kept (default: ~/.cache/dinofeat/results)")
    p.add_argument("--cache-gb", type=float, help="disk budget of the result cache in GB; 0 turns it off (default 8)")
    limits = p.add_argument_group("limits", "override the config file's [limits]; the README lists the defaults")
    for name, (kind, meaning) in LIMIT_FLAGS.items():
        limits.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N", help=meaning)
