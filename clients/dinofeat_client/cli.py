"""The `dinofeat` command line. Without --server it starts an embedded server in this process."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .client import FeatureClient
from .errors import DinofeatError
from .images import check_image, check_labels, check_output_path, read_image, write_png, write_tiff
from .metrics import class_iou
from .pictures import class_overlay
from .sample import three_phase_sample
from .wire import DEFAULT_BACKBONE, DEFAULT_PRESET, NORMALISATIONS


class ProgressBars:
    """One tqdm bar per stage reported by the server ("features", "training", "receiving", ...)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>13}", unit="", leave=False, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[FeatureClient]:
    """A client for --server, or for an embedded server started here (needs dinofeat[server])."""
    if args.server:
        if getattr(args, "weights", None):
            raise DinofeatError("--weights names a file on this machine, but --server computes elsewhere; "
                                "give the weights to that server (dinofeat serve --weights ...).")
        with FeatureClient(args.server) as client:
            yield client
        return
    try:
        from dinofeat_server.service.server import EmbeddedServer
    except ImportError:
        raise DinofeatError("no --server was given and the server part is not installed here; "
                            "pass --server ADDRESS or install dinofeat[server].") from None
    weights = {getattr(args, "backbone", DEFAULT_BACKBONE): args.weights} if getattr(args, "weights", None) else None
    with EmbeddedServer(args.device, weights) as address, FeatureClient(address) as client:
        yield client


def command_sets(args: argparse.Namespace) -> None:
    with connect(args) as client:
        for info in client.feature_sets():
            print(f"{info.name:<12} {info.channels_per_image_channel:>4} channels  {info.description}")


def command_features(args: argparse.Namespace, bars: ProgressBars) -> None:
    image = check_image(read_image(args.image))
    check_output_path(args.output)
    with connect(args) as client:
        transfer = client.fetch_features(image, args.output, args.set, args.compression, args.level, progress=bars,
                                         **deep_options(args))
    bars.close()
    resumed = "" if transfer.chunks_received == transfer.chunk_count else f" (resumed: {transfer.chunks_received} of {transfer.chunk_count} chunks fetched now)"
    print(f"wrote {transfer.path}{resumed}")


def command_segment(args: argparse.Namespace, bars: ProgressBars) -> None:
    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    for path in (args.output, args.probabilities):
        if path:
            check_output_path(path)
    with connect(args) as client:
        output, probabilities = client.segment(image, labels, args.output, args.set, args.probabilities,
                                               args.trees, args.seed, progress=bars, **deep_options(args))
    bars.close()
    print(f"wrote {output}" + (f" and {probabilities}" if probabilities else ""))


def deep_options(args: argparse.Namespace) -> dict:
    return {"backbone": args.backbone, "preset": args.preset, "pca": args.pca, "normalise": args.normalise}


def weights_map(entries: list[str]) -> dict[str, str]:
    """`--weights NAME=PATH` for one backbone, `--weights PATH` for any backbone without its own."""
    mapping = {}
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        mapping[name] = path
    return mapping


def command_serve(args: argparse.Namespace) -> None:
    try:
        from dinofeat_server.service.server import serve
    except ImportError:
        raise DinofeatError("serving needs the server part; install dinofeat[server].") from None
    serve(args.host, args.port, args.device, args.insecure, weights_map(args.weights))


def command_demo(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Generate a sample micrograph with scribbles, then features, segmentation and a picture of it."""
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    sample = three_phase_sample()
    write_tiff(folder / "sample.tif", sample.image)
    write_tiff(folder / "scribbles.tif", sample.scribbles)
    write_tiff(folder / "ground_truth.tif", sample.truth)
    with connect(args) as client:
        features = client.fetch_features(sample.image, folder / "features.h5", args.set, progress=bars, **deep_options(args))
        segmentation, probabilities = client.segment(sample.image, sample.scribbles, folder / "segmentation.tif", args.set,
                                                     folder / "probabilities.h5", progress=bars, **deep_options(args))
    bars.close()
    class_map = read_image(segmentation)
    write_png(folder / "segmentation.png", class_overlay(sample.image, class_map))
    ious = class_iou(class_map, sample.truth)
    print(f"demo on a generated {sample.image.shape[1]}x{sample.image.shape[0]} three-phase micrograph, "
          f"{int((sample.scribbles > 0).sum())} scribbled pixels, feature set '{args.set}':")
    for name in ("sample.tif", "scribbles.tif", "ground_truth.tif"):
        print(f"  input         {folder / name}")
    print(f"  features      {features.path}")
    print(f"  segmentation  {segmentation}  (probabilities: {probabilities})")
    print(f"  picture       {folder / 'segmentation.png'}")
    print("  IoU per class " + ", ".join(f"{v}: {iou:.3f}" for v, iou in ious.items())
          + f"; mIoU {sum(ious.values()) / len(ious):.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinofeat", description="DINOv2 and classical feature stacks for Fiji, ilastik and Python.")
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="ADDRESS", help="host:port of a dinofeat server (default: start one in this process)")
    remote.add_argument("--device", default="auto", help="device of the embedded server: auto, cpu, cuda[:N] (default: auto)")
    remote.add_argument("--quiet", action="store_true", help="no progress bars")
    deep = argparse.ArgumentParser(add_help=False)
    deep.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"DINOv2 backbone for the deep sets (default {DEFAULT_BACKBONE})")
    deep.add_argument("--preset", default=DEFAULT_PRESET, help="fast, default, paper or paper_flips (default: default)")
    deep.add_argument("--pca", type=int, default=0, help="PCA components of the deep features (0: all for dinov2, 32 for hybrid)")
    deep.add_argument("--normalise", choices=NORMALISATIONS, default="none",
                      help="dinov2/attention scaling: per-channel minmax or zscore, per-pixel l2 (default none)")
    deep.add_argument("--weights", help="weights file for the backbone (embedded server only; default: official download)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("sets", parents=[remote], help="list the feature sets the server offers")

    p = commands.add_parser("features", parents=[remote, deep], help="compute a feature stack and write it as HDF5")
    p.add_argument("image", help="TIFF (2-D, RGB or stack; 8/16-bit or float), PNG or JPEG")
    p.add_argument("-o", "--output", required=True, help="the .h5 file to write")
    p.add_argument("--set", default="classical", help="feature set name (see `dinofeat sets`)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip", help="HDF5 chunk compression (default gzip)")
    p.add_argument("--level", type=int, default=1, choices=range(1, 10), metavar="1-9", help="gzip level (default 1)")

    p = commands.add_parser("segment", parents=[remote, deep], help="segment an image from sparse scribbles")
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values)")
    p.add_argument("--set", default="classical", help="feature set name (default classical)")
    p.add_argument("--probabilities", help="also write the per-class probabilities to this .h5 file")
    p.add_argument("--trees", type=int, default=0, help="trees in the random forest (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the forest (default 0)")

    p = commands.add_parser("serve", help="run a feature server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without token or TLS")
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]PATH",
                   help="local weights for a backbone (repeatable); a bare PATH serves any backbone")

    p = commands.add_parser("demo", parents=[remote, deep], help="run the whole job on a generated sample")
    p.add_argument("-o", "--output", default="dinofeat-demo", help="folder for the results (default ./dinofeat-demo)")
    p.add_argument("--set", default="classical", help="feature set name (default classical)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bars = ProgressBars(enabled=not getattr(args, "quiet", False) and sys.stderr.isatty())
    try:
        if args.command == "sets":
            command_sets(args)
        elif args.command == "features":
            command_features(args, bars)
        elif args.command == "segment":
            command_segment(args, bars)
        elif args.command == "serve":
            command_serve(args)
        elif args.command == "demo":
            command_demo(args, bars)
    except DinofeatError as error:
        bars.close()
        print(f"dinofeat: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print("dinofeat: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
