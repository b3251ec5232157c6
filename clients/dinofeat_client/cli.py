"""The `dinofeat` command line. Without --server it starts an embedded server in this process."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from . import __version__, local_server
from .client import PLAINTEXT_TOKEN_FLAG, PLAINTEXT_TOKEN_VARIABLE, FeatureClient, Transfer
from .errors import DinofeatError
from .feature_sets import SETS
import h5py
import numpy as np

from .durations import spoken_duration
from .batch import BatchReport, image_files, output_folder, run_batch, writes_to_folder
from .imagej_tiff import write_imagej_hyperstack
from .ilastik.provider import ILASTIK_PCA
from .images import check_image, check_labels, check_mask, image_axes, read_image, write_png, write_tiff
from .metrics import class_dice, class_iou, matched_to_truth
from .outputs import atomic_result, io_failure, is_write_error, output_file, remove_quietly, tidy_on_failure, writing
from .pictures import class_overlay, colour_names, drawable, probability_pictures
from .sample import three_phase_sample
from .tokens import read_tokens
from .weka_arff import write_arff
from .spaces import read_space
from .wire import DEFAULT_BACKBONE, DEFAULT_PRESET, NORMALISATIONS


class ProgressBars:
    """Progress of each stage the server reports ("tiles", "views", "training", "images", ...).

    On a terminal: one tqdm bar per stage, with its rate and the time left. Elsewhere (logs, pipes,
    batch jobs): one line per stage on stderr every `every_s` seconds while it runs, with the same
    figures, so a long job's log shows it is alive and when it should end; quick stages print nothing."""

    def __init__(self, enabled: bool, terminal: bool = True, every_s: float = 10.0):
        self.enabled = enabled
        self.terminal = terminal
        self.every_s = every_s
        self.bars: dict[str, tqdm] = {}
        self.started: dict[str, tuple[float, float]] = {}  # stage -> (start, last line)
        self.last_heard = time.monotonic()  # a stage first heard midway began when the message before it came

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        began, self.last_heard = self.last_heard, time.monotonic()
        if not self.terminal:
            self.log_line(stage, done, total, began)
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>13}", unit="", leave=False, dynamic_ncols=True)
            if done:
                bar.start_t -= self.last_heard - began
        bar.total = total
        bar.n = done
        bar.refresh()

    def log_line(self, stage: str, done: int, total: int, began: float) -> None:
        now = time.monotonic()
        start, last = self.started.setdefault(stage, (began if done else now, now))
        if now - last < self.every_s or done == 0:
            return
        self.started[stage] = (start, now)
        rate = done / max(now - start, 1e-9)
        left = f", about {spoken_duration((total - done) / rate)} left" if 0 < done < total else ""
        share = f" ({100 * done // total} %)" if total else ""
        print(f"dinofeat: {stage} {done}/{total}{share}, {rate:.3g}/s{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.started.clear()


def progress_seconds() -> float:
    """Seconds between progress lines when stderr is not a terminal: $DINOFEAT_PROGRESS_SECONDS, default 10."""
    value = os.environ.get("DINOFEAT_PROGRESS_SECONDS", "10")
    try:
        return max(float(value), 0.0)
    except ValueError:
        print(f"dinofeat: DINOFEAT_PROGRESS_SECONDS is {value!r}, not a number of seconds; using 10.", file=sys.stderr)
        return 10.0


def say(message: str) -> None:
    """A line for the user on stderr: retries, and notices from the server (e.g. a long computation's estimate)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[FeatureClient]:
    """A client for --server; else for this user's local server (local_server.py: started once, it keeps torch and
    models loaded between commands), or with --no-local-server for an embedded server started here (needs dinofeat[server])."""
    if args.server:
        if getattr(args, "weights", None):
            raise DinofeatError("--weights names a file on this machine, but --server computes elsewhere; "
                                "give the weights to that server (dinofeat serve --weights ...).")
        token = read_tokens(args.token_file)[0] if args.token_file else os.environ.get("DINOFEAT_TOKEN")
        insecure_token = args.insecure_token or os.environ.get(PLAINTEXT_TOKEN_VARIABLE, "").lower() in ("1", "true", "yes", "on")
        with FeatureClient(args.server, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           retries=args.retries, notify=say, insecure_token=insecure_token) as client:
            yield client
        return
    weights = {getattr(args, "backbone", DEFAULT_BACKBONE): args.weights} if getattr(args, "weights", None) else None
    address = local_server.local_address(args.device, weights, notify=say) if local_server.wanted(args) else None
    if address:
        with FeatureClient(address, notify=say) as client:
            yield client
        return
    try:
        from dinofeat_server.service.server import EmbeddedServer
    except ImportError:
        raise DinofeatError("no --server was given and the server part is not installed here; "
                            "pass --server ADDRESS or install dinofeat[server].") from None
    with EmbeddedServer(args.device, weights) as address, FeatureClient(address, notify=say) as client:
        yield client


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
          f"  threads           {status.threads_per_worker} per worker (torch, BLAS/OpenMP, random forest)\n"
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


SUFFIXES = {"h5": (".h5", ".hdf5", ".hdf"), "tiff": (".tif", ".tiff"), "png": (".png",)}
"""What each output format's files are called; an output named otherwise is refused, never mislabelled."""


def checked_suffix(output: str, formats: tuple[str, ...], command: str) -> str:
    """The format an output's suffix names, among `formats`; anything else gets one sentence."""
    suffix = Path(output).suffix.lower()
    for name in formats:
        if suffix in SUFFIXES[name]:
            return name
    names = " or ".join(SUFFIXES[name][0] for name in formats)
    raise DinofeatError(f"dinofeat {command} writes {names} files, not {suffix or 'files without a suffix'!r}; "
                        f"name the output {Path(output).stem}{SUFFIXES[formats[0]][0]}.")


def output_format(args: argparse.Namespace) -> str:
    """--format when it agrees with the output's suffix, else what the suffix says (.h5: HDF5, .tif: an
    ImageJ hyperstack)."""
    named = checked_suffix(args.output, ("h5", "tiff"), "features")
    if args.format and args.format != named:
        raise DinofeatError(f"--format {args.format} does not match the output name {args.output}; "
                            f"name it {Path(args.output).stem}{SUFFIXES[args.format][0]}.")
    return named


def hidden_features_path(output: str) -> Path:
    """Where features go before they become another file (kept there if the stream breaks, for a resume)."""
    output = Path(output)
    return output.absolute().parent / f".{output.name}.features.h5"


def fetch(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, path: str | Path, **encoding) -> Transfer:
    """The features of `image` (--set and the deep options) from the server into `path`."""
    like = like_json(args.like) if getattr(args, "like", None) else None
    with connect(args) as client:
        transfer = client.fetch_features(image, path, args.set, progress=bars, **encoding, **deep_options(args), like=like)
    bars.close()
    return transfer


@contextlib.contextmanager
def hidden_features(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, output: str,
                    **encoding) -> Iterator[Transfer]:
    """Features fetched into a hidden .h5 beside `output` for the caller to turn into another file; removed after."""
    transfer = fetch(args, image, bars, hidden_features_path(output), **encoding)
    try:
        yield transfer
    finally:
        remove_quietly(transfer.path)


def command_features(args: argparse.Namespace, bars: ProgressBars) -> None:
    if wants_zarr(args):
        return zarr_features(args, bars)
    image = check_image(read_image(args.image))
    output_file(args.output)
    encoding = {"compression": args.compression, "level": args.level}
    if output_format(args) == "tiff":
        with hidden_features(args, image, bars, args.output, **encoding) as transfer, h5py.File(transfer.path, "r") as f:
            written = write_imagej_hyperstack(f["features"], args.output)
    else:
        transfer = fetch(args, image, bars, args.output, **encoding)
        written = transfer.path
    resumed = "" if transfer.chunks_received == transfer.chunk_count else f" (resumed: {transfer.chunks_received} of {transfer.chunk_count} chunks fetched now)"
    print(f"wrote {written}{resumed}")


def zarr_features(args: argparse.Namespace, bars: ProgressBars) -> None:
    """features -o OUT.zarr: OME-Zarr computed in this process, or as one Dask task per slice on the workers of
    --dask (which read the volume from the same path); needs dinofeat[server,volumes] (imported only here)."""
    volumes = zarr_run(args, "features")
    from dinofeat_server.engine.space import FeatureSpace
    from dinofeat_server.engine.stacks import FeatureOptions

    like = FeatureSpace.from_dict(json.loads(like_json(args.like))) if args.like else None
    weights = {args.backbone: args.weights} if args.weights else None
    with dask_or_here(args, volumes) as client:
        written = volumes.features_to_zarr(args.image, args.output, args.set, options=FeatureOptions(**deep_options(args)),
                                           device=args.device, weights=weights, client=client, like=like,
                                           overwrite=args.overwrite, progress=bars)
    bars.close()
    print(f"wrote {written}")


def wants_zarr(args: argparse.Namespace) -> bool:
    """Whether the command writes OME-Zarr (-o OUT.zarr) or runs on Dask (--dask): the volume code paths."""
    return bool(args.dask) or Path(args.output).suffix.lower() == ".zarr"


def zarr_run(args: argparse.Namespace, command: str, suffix: str = ".zarr"):
    """The volumes package, after refusing a volume run that cannot be one (output not named `suffix`, or --server)."""
    if suffix == ".zarr" and Path(args.output).suffix.lower() != suffix:
        raise DinofeatError(f"--dask writes OME-Zarr; name the output {Path(args.output).stem}.zarr.")
    if args.server:
        raise DinofeatError(f"dinofeat {command} -o OUT{suffix} with --dask computes on Dask workers (or in this process), "
                            "not by --server; leave out one of them.")
    try:
        import dinofeat_server.volumes as volumes
    except ImportError:
        raise DinofeatError("OME-Zarr outputs and --dask need dinofeat[server,volumes] here (torch, dask, distributed, "
                            "zarr, ome-zarr).") from None
    return volumes


@contextlib.contextmanager
def dask_or_here(args: argparse.Namespace, volumes) -> Iterator[object | None]:
    """The Dask client of --dask (TLS from --dask-tls-*), or None: compute in this process."""
    tls = (args.dask_tls_ca, args.dask_tls_cert, args.dask_tls_key)
    if not args.dask:
        if any(tls):
            raise DinofeatError("--dask-tls-* secure a Dask scheduler; give its address with --dask tls://HOST:PORT.")
        yield None
        return
    with volumes.dask_client(args.dask, args.dask_workers, volumes.dask_security(args.dask, *tls)) as client:
        yield client


def like_json(path: str) -> str:
    """The feature space JSON for --like: a feature file (.h5), a model (.dfm), or an OME-Zarr store dinofeat wrote."""
    if not Path(path).is_dir():
        return read_space(path)
    try:
        stored = json.loads((Path(path) / ".zattrs").read_text()).get("dinofeat", {})
    except (OSError, ValueError, AttributeError):
        stored = {}
    if not stored.get("feature_space"):
        raise DinofeatError(f"{path} is not an OME-Zarr store that dinofeat wrote; --like takes a feature file (.h5 or .zarr) "
                            "or a model (.dfm).")
    if not stored.get("complete"):
        raise DinofeatError(f"{path} is incomplete (its computation stopped); compute it again, or take --like from another.")
    return json.dumps(stored["feature_space"], sort_keys=True)


def zarr_apply(args: argparse.Namespace, bars: ProgressBars) -> None:
    """apply MODEL VOLUME -o OUT.zarr: the label image (and probabilities) as OME-Zarr, one task per slice."""
    volumes = zarr_run(args, "apply")
    if len(args.images) != 1:
        raise DinofeatError(f"-o {args.output} takes one volume, not {len(args.images)} inputs; apply to each in its own run.")
    weights = {"*": args.weights} if args.weights else None
    with dask_or_here(args, volumes) as client:
        written = volumes.classify_to_zarr(args.images[0], args.model, args.output, probabilities=args.probabilities,
                                           levels=args.pyramid, feature_set=args.set or "", device=args.device,
                                           weights=weights, client=client, overwrite=args.overwrite, progress=bars)
    bars.close()
    print("wrote " + ", ".join(str(path) for path in written if path))


def dask_train(args: argparse.Namespace, bars: ProgressBars) -> None:
    """train VOLUME --labels LABELS -o MODEL.dfm --dask ...: features of the labelled slices as Dask tasks, the
    classifier trained here on their labelled pixels."""
    volumes = zarr_run(args, "train", ".dfm")
    if len(args.images) != 1 or len(args.labels) != 1:
        raise DinofeatError("with --dask, train on one volume and its labels (a stack holds many slices).")
    from dinofeat_server.engine.stacks import FeatureOptions

    output_file(args.output)
    weights = {args.backbone: args.weights} if args.weights else None
    with dask_or_here(args, volumes) as client:
        _, trained = volumes.train_volume(args.images[0], args.labels[0], args.set, options=FeatureOptions(**deep_options(args)),
                                          kind=args.classifier, trees=args.trees, seed=args.seed, device=args.device,
                                          weights=weights, client=client, progress=bars)
    volumes.save_model(trained, args.output)
    bars.close()
    meta = trained.metadata
    print(f"wrote {args.output}: {args.classifier} on {meta['labelled_pixels']} labelled pixels, "
          f"classes {', '.join(str(v) for v in meta['class_values'])}")


def zarr_segment(args: argparse.Namespace, bars: ProgressBars) -> None:
    """segment VOLUME --labels LABELS -o OUT.zarr: train on the labelled slices, then write the label image."""
    volumes = zarr_run(args, "segment")
    from dinofeat_server.engine.stacks import FeatureOptions

    weights = {args.backbone: args.weights} if args.weights else None
    with dask_or_here(args, volumes) as client:
        written = volumes.segment_to_zarr(args.image, args.labels, args.output, args.set, options=FeatureOptions(**deep_options(args)),
                                          kind=args.classifier, trees=args.trees, seed=args.seed,
                                          probabilities=args.probabilities, levels=args.pyramid, device=args.device,
                                          weights=weights, client=client, overwrite=args.overwrite, progress=bars)
    bars.close()
    print("wrote " + ", ".join(str(path) for path in written if path))


def fiji_features(args: argparse.Namespace, image: np.ndarray, bars: ProgressBars, output: str):
    """Start Fiji (it must run before anything else starts a JVM), then fetch the image's features (hidden_features)."""
    from .fiji.jvm import start_fiji

    fiji_dir = args.fiji or os.environ.get("FIJI_DIR")
    if not fiji_dir:
        raise DinofeatError("the Fiji bridge needs a local Fiji: pass --fiji /path/to/Fiji.app or set FIJI_DIR.")
    start_fiji(fiji_dir)
    return hidden_features(args, image, bars, output)


def greyscale(image: np.ndarray) -> np.ndarray:
    """What TWS is shown of the image (our features carry the colour): the mean over RGB channels."""
    return image.mean(axis=-1) if image_axes(image).endswith("c") else image


def command_fiji_train(args: argparse.Namespace, bars: ProgressBars) -> None:
    from .fiji import tws

    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    output_file(args.output)
    with fiji_features(args, image, bars, args.output) as features:
        values = atomic_result(args.output, lambda temporary: tws.train(greyscale(image), labels, features.path, temporary, args.seed))
    print(f"wrote {args.output} (Trainable Weka Segmentation classifier, classes {', '.join(map(str, values))}, "
          f"{args.set} features)")


def command_fiji_apply(args: argparse.Namespace, bars: ProgressBars) -> None:
    from .fiji import tws

    image = check_image(read_image(args.image))
    check_outputs(args.output, args.probabilities)
    if not Path(args.classifier).is_file():
        raise DinofeatError(f"cannot read {args.classifier}: no such classifier file.")
    with fiji_features(args, image, bars, args.output) as features:
        probabilities, values = tws.apply(args.classifier, greyscale(image), features.path)
    write_tiff(Path(args.output), tws.class_map(probabilities, values))
    if args.probabilities:
        write_tiff(Path(args.probabilities), probabilities.astype(np.float32))
    print(f"wrote {args.output}" + (f" and {args.probabilities}" if args.probabilities else ""))


def command_arff(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Features of the labelled pixels as a Weka ARFF file."""
    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    output_file(args.output)
    with hidden_features(args, image, bars, args.output) as transfer, h5py.File(transfer.path, "r") as f:
        write_arff(f["features"], labels, args.output, relation=Path(args.image).stem)
    print(f"wrote {args.output} ({int((labels != 0).sum())} labelled pixels, {len(np.unique(labels[labels != 0]))} classes)")


def command_segment(args: argparse.Namespace, bars: ProgressBars) -> None:
    if wants_zarr(args):
        return zarr_segment(args, bars)
    image = check_image(read_image(args.image))
    labels = check_labels(read_image(args.labels), image)
    check_outputs(args.output, args.probabilities)
    with connect(args) as client:
        output, probabilities = client.segment(image, labels, args.output, args.set, probabilities_target(args, args.output, args.probabilities),
                                               args.trees, args.seed, progress=bars, classifier=args.classifier, **deep_options(args))
    bars.close()
    report_segmentation(args, image, output, probabilities, keep=bool(args.probabilities))


def check_outputs(*paths: str | None) -> None:
    """Refuse, before any upload, outputs that cannot be written (outputs.output_file; their folders are created)."""
    for path in paths:
        if path:
            output_file(path)


def probabilities_target(args: argparse.Namespace, output: str | Path, requested: str | Path | None) -> Path | None:
    """Where the probabilities go: the file the user asked for, else a hidden one when --pictures draws them."""
    if requested:
        return Path(requested)
    return Path(output).with_name(f".{Path(output).name}.pictures.h5") if args.pictures else None


def write_pictures(image: np.ndarray, output: Path, probabilities: Path | None, written: list[Path]) -> str:
    """The overlay and probability maps beside `output` (appended to `written`); returns what to add to the report."""
    image, class_map, z, note = drawable(image, read_image(output))
    written.append(write_png(output.with_suffix(".overlay.png"), class_overlay(image, class_map)))
    if probabilities:
        with h5py.File(probabilities, "r") as f:
            for value, picture in probability_pictures(f["probabilities"], z):
                written.append(write_png(output.with_suffix(f".p{value}.png"), picture))
    return note + "; overlay colours: " + colour_names([int(v) for v in np.unique(class_map)])


def report_segmentation(args: argparse.Namespace, image: np.ndarray, output: Path, probabilities: Path | None,
                        keep: bool = True) -> None:
    """Say what was written; with --pictures also write the class overlay (with its legend) and one
    probability map per class as PNG, of the middle slice for a stack. Probabilities not asked for
    (`keep` False) are removed once drawn."""
    written = [output] + ([probabilities] if probabilities and keep else [])
    note = ""
    try:
        if args.pictures:
            note = write_pictures(image, output, probabilities, written)
    finally:
        if probabilities and not keep:
            remove_quietly(probabilities)
    print("wrote " + ", ".join(str(p) for p in written) + note)


def command_train(args: argparse.Namespace, bars: ProgressBars) -> None:
    if args.dask:
        return dask_train(args, bars)
    if len(args.images) != len(args.labels):
        raise DinofeatError(f"give one --labels file per image ({len(args.images)} images, {len(args.labels)} label files).")
    images = [check_image(read_image(p)) for p in args.images]
    labels = [check_labels(read_image(p), i) for p, i in zip(args.labels, images)]
    output_file(args.output)
    with connect(args) as client:
        summary = client.train(images, labels, args.output, args.set, args.classifier, args.trees, args.seed,
                               progress=bars, **deep_options(args))
    bars.close()
    print(f"wrote {args.output}: {summary.classifier} on {summary.labelled_pixels} labelled pixels, "
          f"classes {', '.join(str(v) for v in summary.class_values)}")


def command_apply(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Apply a model to one image (-o the class map) or many (-o a folder), with one model upload; a volume to
    -o OUT.zarr (in this process, or on --dask workers) as zarr_apply."""
    if wants_zarr(args):
        return zarr_apply(args, bars)
    inputs = image_files(args.images)
    if not writes_to_folder(inputs, args.output):
        image = check_image(read_image(inputs[0]))
        requested = Path(args.output).with_suffix(".probabilities.h5") if args.probabilities is True else args.probabilities
        check_outputs(args.output, requested)
        with connect(args) as client:
            output, probabilities = client.apply(args.model, image, args.output, probabilities_target(args, args.output, requested),
                                                 args.set or "", progress=bars)
        bars.close()
        report_segmentation(args, image, output, probabilities, keep=bool(requested))
        return
    if isinstance(args.probabilities, str):
        raise DinofeatError("with an output folder --probabilities takes no file name: each image's probabilities "
                            "go to OUTDIR/NAME.probabilities.h5.")
    folder = output_folder(args.output)

    def outputs(path: Path) -> tuple[Path, Path | None]:
        return folder / f"{path.stem}.tif", folder / f"{path.stem}.probabilities.h5" if args.probabilities else None

    with connect(args) as client:
        def work(path: Path) -> None:
            image = check_image(read_image(path))
            output, requested = outputs(path)
            output, probabilities = client.apply(args.model, image, output, probabilities_target(args, output, requested),
                                                 args.set or "", progress=bars)
            report_segmentation(args, image, output, probabilities, keep=bool(requested))

        report = run_batch(inputs, work, lambda path: not args.overwrite and outputs(path)[0].exists(), bars)
    bars.close()
    finish_batch(report, len(inputs))


def finish_batch(report: BatchReport, total: int, then: Callable[[], None] = lambda: None) -> None:
    """Print the batch's summary (and what `then` prints); any failure makes the command fail (exit status 1)."""
    print(report.summary())
    then()
    if report.failed:
        raise DinofeatError(f"{len(report.failed)} of {total} images failed (see above).")


def take_dataset(path: Path, name: str) -> np.ndarray:
    """Read a whole dataset from a temporary result file, then remove the file."""
    try:
        with h5py.File(path, "r") as f:
            return f[name][()]
    finally:
        remove_quietly(path)


def command_cluster(args: argparse.Namespace, bars: ProgressBars) -> None:
    checked_suffix(args.output, ("tiff",), "cluster")
    image = check_image(read_image(args.image))
    folder = output_file(args.output).absolute().parent
    with connect(args) as client:
        path = client.analyse(image, "kmeans", folder / f".{Path(args.output).name}.h5", args.set, args.clusters, args.seed,
                              progress=bars, **deep_options(args))
    bars.close()
    labels = take_dataset(path, "labels")[0]
    written, note = [write_tiff(Path(args.output), labels)], ""
    if args.pictures:
        plane, classes, _, note = drawable(image, labels)
        written.append(write_png(Path(args.output).with_suffix(".overlay.png"), class_overlay(plane, classes)))
    print(f"wrote {', '.join(str(p) for p in written)} ({args.clusters} clusters, labels 1..{args.clusters}){note}")


def command_pca(args: argparse.Namespace, bars: ProgressBars) -> None:
    kind = checked_suffix(args.output, ("png", "tiff"), "pca")
    image = check_image(read_image(args.image))
    if kind == "png" and image_axes(image).startswith("z"):
        raise DinofeatError(f"a stack gives one picture per slice, which PNG cannot hold; name the output {Path(args.output).stem}.tif.")
    folder = output_file(args.output).absolute().parent
    with connect(args) as client:
        path = client.analyse(image, "pca", folder / f".{Path(args.output).name}.h5", args.set, progress=bars, **deep_options(args))
    bars.close()
    picture = np.moveaxis(take_dataset(path, "picture"), 0, -1)  # (Y, X, 3), or (Z, Y, X, 3) for a stack
    print(f"wrote {(write_png if kind == 'png' else write_tiff)(Path(args.output), picture)}")


def command_fewshot(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Segment each query from the supports; -o is a folder of QUERY_mask.tif files (see batch.py)."""
    if len(args.support) != len(args.support_mask):
        raise DinofeatError("give one --support-mask per --support image.")
    supports = [check_image(read_image(p)) for p in args.support]
    masks = [check_mask(read_image(p), support, f"the support mask {p}") for p, support in zip(args.support_mask, supports)]
    queries = image_files(args.queries)
    folder = output_folder(args.output)
    with connect(args) as client:
        def work(path: Path) -> None:
            query = check_image(read_image(path))
            result = client.few_shot(supports, masks, query, folder / f".{path.stem}.fewshot.h5", args.set, args.window, args.grid,
                                     "all" if args.all_components else args.components, progress=bars, **deep_options(args))
            mask = (take_dataset(result, "fewshot")[0] > 0.5).astype(np.uint8) * 255
            written, note = [write_tiff(folder / f"{path.stem}_mask.tif", mask)], ""
            if args.pictures:
                plane, classes, _, note = drawable(query, mask)
                written.append(write_png(folder / f"{path.stem}_mask.overlay.png", class_overlay(plane, classes)))
            print("wrote " + ", ".join(str(p) for p in written) + note)

        report = run_batch(queries, work, lambda path: not args.overwrite and (folder / f"{path.stem}_mask.tif").exists(), bars)
    bars.close()
    finish_batch(report, len(queries))


def command_ilastik(args: argparse.Namespace, bars: ProgressBars) -> None:
    import shlex

    from .ilastik.provider import (FEATURE_FILE, QUANTISATIONS, IlastikSpec, batch_features, build_project, find_project,
                                   headless_command, launcher_from, store_classifier, training_command)

    if bool(args.output) == bool(args.batch):
        raise DinofeatError("give -o FOLDER for a new project, or --batch PROJECT for new images of an existing one.")
    if args.batch:
        folder, project, state = find_project(Path(args.batch))  # refuses a foreign or damaged .ilp before writing anything
        output_folder(folder)  # and a project folder this user cannot write in
        launcher = launcher_from(args.ilastik)
        inputs = image_files(args.images)  # files, folders and globs, as every command with several images

        def feature_file(path: Path) -> Path:
            return folder / Path(path).stem / FEATURE_FILE

        def within_batch(stage: str, done: int, total: int) -> None:
            if stage != "images":  # run_batch counts the images
                bars(stage, done, total)

        with connect(args) as client, writing(folder):
            report = run_batch(inputs, lambda path: batch_features(client, folder, [(str(path), check_image(read_image(path)))],
                                                                  progress=within_batch),
                               lambda path: not args.overwrite and feature_file(path).exists(), bars)
        bars.close()
        files = [feature_file(path) for path in inputs if feature_file(path).exists() and path not in dict(report.failed)]
        if report.done:
            print("wrote " + ", ".join(str(feature_file(path)) for path in report.done))

        def hints() -> None:  # after the summary: the command to copy comes last
            if not (project and files):
                return
            if not state.labelled and not state.classifier:
                print(f"{project.name} has no labels yet: label in ilastik (Training) and save the project before predicting.")
            elif not state.classifier:
                print(f"{project.name} stores no classifier, so ilastik trains one from its labels at the start of each run "
                      f"(to store one: {training_command(project, launcher)})")
            print("predict them with the trained project:\n  " + headless_command(project, files, launcher))

        finish_batch(report, len(inputs), hints)
        return
    folder = Path(args.output)
    images = [(p, check_image(read_image(p))) for p in args.images]
    if args.quantise not in QUANTISATIONS:
        raise DinofeatError(f"unknown quantisation {args.quantise!r}; choose one of {', '.join(QUANTISATIONS)}.")
    scribbles = None
    if args.labels:
        if len(args.labels) != len(images):
            raise DinofeatError(f"give one scribble file per image ({len(images)} images, {len(args.labels)} scribble files).")
        scribbles = [check_labels(read_image(p), image) for p, (_, image) in zip(args.labels, images)]
    if args.ilastik and not scribbles:
        raise DinofeatError("--ilastik trains the project's classifier from the scribbles; give them with --labels too.")
    launcher = launcher_from(args.ilastik) if scribbles else None  # checked before the features are computed
    created = not folder.exists()
    output_folder(folder)
    deep = any(known.name == args.set and known.deep for known in SETS)  # filter banks need no PCA
    spec = IlastikSpec(args.set, args.backbone, args.preset, args.pca if args.pca else (ILASTIK_PCA if deep else 0), args.quantise)
    try:
        with connect(args) as client, writing(folder):
            project, files = build_project(client, images, folder, spec, scribbles, args.classes, args.name, progress=bars)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a failed first run leaves no empty project folder behind
        raise
    bars.close()
    print(f"wrote {project} with {len(files)} lane(s): {', '.join(str(f.relative_to(folder)) for f in files)}")
    if launcher:
        if bars.enabled:
            say("dinofeat: ilastik (headless) is training the classifier from the labels...")
        seconds = store_classifier(project, launcher)
        print(f"stored the classifier ilastik trained from the labels in {project.name} ({seconds:.0f} s): "
              "headless runs predict without retraining")
    elif scribbles:
        print(f"ilastik will train the classifier from the labels on its first run, and in every headless run until one is "
              f"stored; to store it, save the project in ilastik or run {training_command(project, None)} (or give "
              "dinofeat --ilastik PATH/run_ilastik.sh)")
    print(f"open it in ilastik (Pixel Classification); new images: dinofeat ilastik --batch {shlex.quote(str(folder))} IMAGE...")


def command_score(args: argparse.Namespace, bars: ProgressBars) -> None:
    prediction, truth = read_image(args.prediction), read_image(args.truth)
    if prediction.shape != truth.shape:
        raise DinofeatError(f"the prediction has shape {prediction.shape} but the ground truth has {truth.shape}; they must match.")
    if args.match:
        prediction = matched_to_truth(prediction, truth)
    elif not set(np.unique(prediction).tolist()) & set(np.unique(truth).tolist()):
        values = ", ".join(str(v) for v in np.unique(prediction)[:8])
        raise DinofeatError(f"the prediction's values ({values}) share none with the ground truth's "
                            f"({', '.join(str(v) for v in np.unique(truth)[:8])}); for a clustering add --match, which pairs "
                            "each cluster with the class it overlaps most (Hungarian assignment).")
    ious, dice = class_iou(prediction, truth), class_dice(prediction, truth)
    print(f"{'class':>8} {'IoU':>7} {'Dice':>7}")
    for value in ious:
        print(f"{value:>8} {ious[value]:7.4f} {dice[value]:7.4f}")
    print(f"{'mean':>8} {np.mean(list(ious.values())):7.4f} {np.mean(list(dice.values())):7.4f}")


def deep_options(args: argparse.Namespace) -> dict:
    return {"backbone": args.backbone, "preset": args.preset, "pca": args.pca, "normalise": args.normalise}


def weights_map(entries: list[str]) -> dict[str, str]:
    """`--weights NAME=PATH` for one backbone, `--weights PATH` for any backbone without its own."""
    mapping = {}
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("*", "", entry)
        mapping[name] = path
    return mapping


def command_serve(args: argparse.Namespace, bars: ProgressBars) -> None:
    try:
        from dinofeat_server.service.config import serve_settings
        from dinofeat_server.service.server import serve
    except ImportError:
        raise DinofeatError("serving needs the server part; install dinofeat[server].") from None
    given = vars(args)
    flags = {key: given[key] for key in SERVE_FLAGS}
    flags["weights"] = weights_map(args.weights) if args.weights else None
    flags["insecure"] = True if args.insecure else None
    settings, limits = serve_settings(args.config, flags, {key: given[key] for key in LIMIT_FLAGS})
    serve(settings, limits)


SERVE_FLAGS = ("host", "port", "device", "devices", "token_file", "tls_cert", "tls_key", "tls_client_ca", "cache_dir", "cache_gb")
LIMIT_FLAGS = {"max_pixels": (int, "samples per image, Z*Y*X*channels"), "max_channels": (int, "feature channels per result"),
               "max_upload_mb": (float, "size of one uploaded image in MiB"),
               "max_streams_per_client": (int, "concurrent requests of one client"),
               "queue_length": (int, "requests waiting for a worker before new ones are refused"),
               "workers": (int, "compute slots on each device: workers x devices requests run at once"),
               "threads": (int, "threads of each worker: torch, BLAS/OpenMP, the random forest "
                                "(default: cores / (workers x devices))"),
               "max_request_seconds": (float, "longest a request may run"),
               "image_store_gb": (float, "memory for uploaded images"),
               "memory_gb": (float, "memory target: tiles of deep features are sized to fit it"),
               "max_output_gb": (float, "size of one result, checked before any work"),
               "max_training_gb": (float, "size of a classifier's trees: classes x labelled pixels x trees x 8 bytes"),
               "stall_seconds": (float, "a client that reads or sends nothing for this long is cut off, freeing its worker"),
               "client_upload_gb": (float, "uploads in flight of one client (images and model files)"),
               "models_gb": (float, "uploaded model files held in memory")}


def command_demo(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Generate a sample micrograph with scribbles, then features, segmentation and a picture of it."""
    folder = output_folder(args.output)
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
    write_png(folder / "segmentation.overlay.png", class_overlay(sample.image, class_map))
    ious = class_iou(class_map, sample.truth)
    print(f"demo on a generated {sample.image.shape[1]}x{sample.image.shape[0]} three-phase micrograph, "
          f"{int((sample.scribbles > 0).sum())} scribbled pixels, feature set '{args.set}':")
    for name in ("sample.tif", "scribbles.tif", "ground_truth.tif"):
        print(f"  input         {folder / name}")
    print(f"  features      {features.path}")
    print(f"  segmentation  {segmentation}  (probabilities: {probabilities})")
    print(f"  picture       {folder / 'segmentation.overlay.png'}  (overlay colours: "
          f"{colour_names([int(v) for v in np.unique(class_map)])})")
    print("  IoU per class " + ", ".join(f"{v}: {iou:.3f}" for v, iou in ious.items())
          + f"; mIoU {sum(ious.values()) / len(ious):.3f}")


def deep_parser(pca_help: str) -> argparse.ArgumentParser:
    """The deep-feature options (backbone, preset, PCA, normalisation, weights); commands differ in the PCA default."""
    deep = argparse.ArgumentParser(add_help=False)
    deep.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"DINOv2 backbone for the deep sets (default {DEFAULT_BACKBONE})")
    deep.add_argument("--preset", default=DEFAULT_PRESET, help="fast, default, paper or paper_flips (default: default)")
    deep.add_argument("--pca", type=int, default=0, help=pca_help)
    deep.add_argument("--normalise", choices=NORMALISATIONS, default="none",
                      help="dinov2/attention scaling: per-channel minmax or zscore, per-pixel l2 (default none)")
    deep.add_argument("--weights", help="weights file for the backbone (embedded server only; default: official download)")
    return deep


def dask_parser() -> argparse.ArgumentParser:
    """Where a volume's tasks run (--dask) and how to reach a TLS scheduler; for commands that write OME-Zarr."""
    dask = argparse.ArgumentParser(add_help=False)
    dask.add_argument("--dask", metavar="ADDRESS", help="compute a volume (TIFF stack, OME-Zarr or HDF5 on storage the workers "
                      "share) as Dask tasks on the scheduler at ADDRESS (tcp://HOST:8786, tls://...), or 'local' for a "
                      "local cluster; writes -o OUT.zarr")
    dask.add_argument("--dask-workers", type=int, default=0, metavar="N", help="workers of --dask local, one thread each "
                      "(default: one per CPU core)")
    dask.add_argument("--dask-tls-ca", metavar="PEM", help="for a tls:// scheduler: the CA that signed its certificate")
    dask.add_argument("--dask-tls-cert", metavar="PEM", help="for a tls:// scheduler: this client's certificate")
    dask.add_argument("--dask-tls-key", metavar="PEM", help="for a tls:// scheduler: this client's key")
    return dask


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinofeat", description="DINOv2 and classical feature stacks for Fiji, ilastik and Python.")
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="ADDRESS", help="host:port of a dinofeat server (default: start one in this process)")
    remote.add_argument("--device", default="auto", help="device of the local or embedded server: auto, cpu, cuda[:N] (default: auto)")
    remote.add_argument("--no-local-server", action="store_true", help="compute in this process instead of in this user's local "
                        "server, which stays loaded between commands (also DINOFEAT_LOCAL_SERVER=0)")
    remote.add_argument("--quiet", action="store_true", help="no progress bars")
    remote.add_argument("--token-file", help="file with the server's access token (default: $DINOFEAT_TOKEN)")
    remote.add_argument("--tls-ca", help="CA certificate that signed the server's TLS certificate (turns TLS on)")
    remote.add_argument("--tls-cert", help="client certificate, for servers that require one")
    remote.add_argument("--tls-key", help="client certificate's key")
    remote.add_argument(PLAINTEXT_TOKEN_FLAG, action="store_true",
                        help="send the access token even without TLS to a server on another machine, where anyone on the way "
                             f"can read it (default: refused; use --tls-ca; also ${PLAINTEXT_TOKEN_VARIABLE}=1)")
    remote.add_argument("--retries", type=int, default=5, metavar="N",
                        help="times to try again when the server is unavailable, pausing 0.5 s, 1 s, 2 s, ... (default 5)")
    deep = deep_parser("PCA components of the deep features (0: all for dinov2, 32 for hybrid)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("sets", parents=[remote], help="list the feature sets the server offers").set_defaults(run=command_sets)
    p = commands.add_parser("local", help="this user's local servers (started by commands without --server): status or stop")
    p.set_defaults(run=command_local)
    p.add_argument("action", nargs="?", choices=("status", "stop"), default="status", help="list them (default) or stop them")
    commands.add_parser("status", parents=[remote], help="what a server is doing: requests, models, memory, cache").set_defaults(
        run=command_status)

    dask = dask_parser()
    p = commands.add_parser("features", parents=[remote, deep, dask], help="compute a feature stack and write it as HDF5")
    p.set_defaults(run=command_features)
    p.add_argument("image", help="TIFF (2-D, RGB or stack; 8/16-bit or float), PNG or JPEG")
    p.add_argument("-o", "--output", required=True, help="the file to write: .h5, .tif for an ImageJ hyperstack, or .zarr for "
                   "OME-Zarr (computed here or with --dask; needs dinofeat[server,volumes])")
    p.add_argument("--format", choices=("h5", "tiff"), help="h5 (HDF5) or tiff (ImageJ hyperstack, channels labelled); "
                   "the output's suffix names it (.h5 / .tif), and must agree with this")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .zarr output that dinofeat did not write")
    p.add_argument("--set", default="classical", help="feature set name (see `dinofeat sets`)")
    p.add_argument("--like", metavar="FILE", help="compute the features in the feature space of an earlier feature file (.h5 "
                   "or a .zarr store dinofeat wrote) or model (.dfm), so they compare with it (default: fit a space on this image)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip", help="HDF5 chunk compression (default gzip)")
    p.add_argument("--level", type=int, default=1, choices=range(1, 10), metavar="1-9", help="gzip level (default 1)")

    fiji = commands.add_parser("fiji", help="Trainable Weka Segmentation in a local Fiji on dinofeat features")
    fiji_commands = fiji.add_subparsers(dest="fiji_command", required=True, metavar="train|apply")
    local_fiji = argparse.ArgumentParser(add_help=False)
    local_fiji.add_argument("--fiji", help="the local Fiji.app folder (default: $FIJI_DIR)")
    local_fiji.add_argument("--set", default="hybrid", help="feature set name (default hybrid)")
    p = fiji_commands.add_parser("train", parents=[remote, deep, local_fiji], help="train a TWS classifier on labelled pixels")
    p.set_defaults(run=command_fiji_train, ends_at_once=True)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the TWS classifier (.model) to write")
    p.add_argument("--seed", type=int, help="the forest's random seed (default: TWS draws one)")
    p = fiji_commands.add_parser("apply", parents=[remote, deep, local_fiji], help="apply a TWS classifier to an image")
    p.set_defaults(run=command_fiji_apply, ends_at_once=True)
    p.add_argument("classifier", help="a .model file from `dinofeat fiji train` or TWS itself (trained on the same set)")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values)")
    p.add_argument("--probabilities", help="also write the per-class probabilities as a TIFF")

    p = commands.add_parser("arff", parents=[remote, deep], help="features of labelled pixels as a Weka ARFF file")
    p.set_defaults(run=command_arff)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="the .arff file to write")
    p.add_argument("--set", default="classical", help="feature set name (default classical)")

    classifier = argparse.ArgumentParser(add_help=False)
    classifier.add_argument("--classifier", choices=("random_forest", "logistic", "gradient_boosting"), default="random_forest",
                            help="random_forest (Weka-like, default), logistic (the paper's for deep features) or gradient_boosting")
    classifier.add_argument("--trees", type=int, default=0, help="trees in the random forest (default 200)")
    classifier.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pictures = argparse.ArgumentParser(add_help=False)
    pictures.add_argument("--pictures", action="store_true", help="also write PNG pictures next to the outputs")
    batch = argparse.ArgumentParser(add_help=False)
    batch.add_argument("--overwrite", action="store_true", help="replace outputs that exist in the output folder (default: skip those images)")

    pyramid = argparse.ArgumentParser(add_help=False)
    pyramid.add_argument("--pyramid", type=int, default=0, metavar="N", help="with -o OUT.zarr: N more levels of the label "
                         "image, each half the last in Y and X (mode of 2 x 2 pixels), for viewers (default 0)")
    p = commands.add_parser("segment", parents=[remote, deep, classifier, pictures, dask, pyramid],
                            help="segment an image from sparse scribbles")
    p.set_defaults(run=command_segment)
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="label image: 0 unlabelled, any other value a class")
    p.add_argument("-o", "--output", required=True, help="class map TIFF to write (in the label values), or an OME-Zarr "
                   "label image OUT.zarr (a volume: trained on its labelled slices, here or with --dask)")
    p.add_argument("--set", default="multiscale", help="feature set name (default multiscale)")
    p.add_argument("--probabilities", help="also write the per-class probabilities to this .h5 file (.zarr for a .zarr output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .zarr output that dinofeat did not write")

    p = commands.add_parser("train", parents=[remote, deep, classifier, dask], help="train a classifier and save it as a model file")
    p.set_defaults(run=command_train)
    p.add_argument("images", nargs="+", help="training images")
    p.add_argument("--labels", nargs="+", required=True, help="one label image per training image, same order")
    p.add_argument("-o", "--output", required=True, help="model file to write (e.g. cells.dfm)")
    p.add_argument("--set", default="multiscale", help="feature set name (default multiscale)")

    p = commands.add_parser("apply", parents=[remote, pictures, batch, dask, pyramid], help="apply a saved model file to images")
    p.set_defaults(run=command_apply)
    p.add_argument("model", help="model file written by `dinofeat train`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders of images, or glob patterns")
    p.add_argument("-o", "--output", required=True,
                   help="class map TIFF to write for one image, or a folder for several (NAME.tif each), or an OME-Zarr label "
                   "image OUT.zarr for one volume (here or with --dask)")
    p.add_argument("--probabilities", nargs="?", const=True,
                   help="also write the per-class probabilities: to this .h5 file (one image), or NAME.probabilities.h5 beside each "
                   "class map; with -o OUT.zarr, float32 to this .zarr (default OUT.probabilities.zarr)")
    p.add_argument("--set", help="check that the model uses this feature set")
    p.add_argument("--weights", help="weights file of a deep model's backbone (embedded server only; its sha256 must be the "
                   "one the model was trained with)")
    p.set_defaults(device="auto", backbone="*")  # --weights serves whichever backbone the model names

    p = commands.add_parser("cluster", parents=[remote, deep, pictures], help="k-means clusters of the features")
    p.set_defaults(run=command_cluster)
    p.add_argument("image")
    p.add_argument("-k", "--clusters", type=int, required=True, help="number of clusters")
    p.add_argument("-o", "--output", required=True, help="label TIFF to write (labels 1..k)")
    p.add_argument("--set", default="classical", help="feature set name (default classical)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = commands.add_parser("pca", parents=[remote, deep], help="3-component PCA picture of the features")
    p.set_defaults(run=command_pca)
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="picture to write: .png, or .tif (one RGB picture per slice of a stack)")
    p.add_argument("--set", default="classical", help="feature set name (default classical)")

    p = commands.add_parser("fewshot", parents=[remote, deep, pictures, batch], help="segment queries from support images and masks")
    p.set_defaults(run=command_fewshot)
    p.add_argument("queries", nargs="+", help="query image files, folders of images, or glob patterns")
    p.add_argument("--support", nargs="+", required=True, help="support image(s)")
    p.add_argument("--support-mask", nargs="+", required=True, help="one mask per support image (non-zero = object)")
    p.add_argument("-o", "--output", required=True, help="folder for QUERY_mask.tif files (created if missing)")
    p.add_argument("--set", default="dinov2", help="feature set name (default dinov2, the frozen encoder of seed 001)")
    p.add_argument("--window", type=int, default=0, help="ALP pooling window in grid cells (default 4)")
    p.add_argument("--grid", type=int, default=0, help="feature grid cell in pixels (default 4)")
    p.add_argument("--components", choices=("auto", "most_confident", "all"), default="auto",
                   help="predicted components each query keeps: auto (default) keeps the most confident one when every "
                        "support mask shows one solid object (an organ), all otherwise (networks, particles)")
    p.add_argument("--all-components", action="store_true", help="the same as --components all")

    p = commands.add_parser("ilastik", parents=[remote, deep_parser(f"PCA components of the deep features (default {ILASTIK_PCA})")],
                            help="feature files and a ready-to-open ilastik project")
    p.set_defaults(run=command_ilastik)
    p.add_argument("images", nargs="+", help="2-D images (one project lane each)")
    p.add_argument("-o", "--output", help="the new project's folder (created if missing)")
    p.add_argument("--set", default="hybrid", help="feature set (default hybrid)")
    p.add_argument("--labels", nargs="+", help="scribbles, one per image, shown in ilastik as labels")
    p.add_argument("--classes", nargs="+", help="class names, in ascending scribble value")
    p.add_argument("--quantise", default="float32", help="float32 (default), uint16 or uint8: smaller files, same classes")
    p.add_argument("--name", default="dinofeat", help="project file name (default dinofeat.ilp)")
    p.add_argument("--batch", metavar="PROJECT", help="add feature files for new images to this existing project (its folder "
                   "or its .ilp; its feature set and space); instead of -o")
    p.add_argument("--ilastik", metavar="RUN_ILASTIK", help="ilastik's run_ilastik.sh (default $DINOFEAT_ILASTIK): with --labels, "
                   "real ilastik trains the classifier once and stores it in the project, so headless runs predict without "
                   "retraining; with --batch, the printed command uses it")
    p.add_argument("--overwrite", action="store_true", help="with --batch: compute feature files again for images that have one "
                   "(default: skip those images)")

    p = commands.add_parser("score", help="per-class IoU and Dice of a class map against a ground truth")
    p.set_defaults(run=command_score)
    p.add_argument("prediction")
    p.add_argument("truth")
    p.add_argument("--match", action="store_true", help="pair the prediction's values with the ground truth's classes first "
                   "(for clusterings: each cluster gets the class it overlaps most, one to one)")

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
                   help="local weights for a backbone (repeatable); a bare PATH serves any backbone")
    p.add_argument("--token-file", help="accepted access tokens, one per line; clients send one as a bearer token")
    p.add_argument("--tls-cert", help="server TLS certificate (PEM)")
    p.add_argument("--tls-key", help="server TLS key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--cache-dir", help="where recent feature results are kept (default: ~/.cache/dinofeat/results)")
    p.add_argument("--cache-gb", type=float, help="disk budget of the result cache in GB; 0 turns it off (default 8)")
    limits = p.add_argument_group("limits", "override the config file's [limits]; the README lists the defaults")
    for name, (kind, meaning) in LIMIT_FLAGS.items():
        limits.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N", help=meaning)

    p = commands.add_parser("demo", parents=[remote, deep], help="run the whole job on a generated sample")
    p.set_defaults(run=command_demo)
    p.add_argument("-o", "--output", default="dinofeat-demo", help="folder for the results (default ./dinofeat-demo)")
    p.add_argument("--set", default="multiscale", help="feature set name (default multiscale)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dinofeat ARGV`; its exit status. Run as the program (no `argv`: the `dinofeat` command, `python -m
    dinofeat_client.cli`), the process ends as soon as the command has finished (see end_process)."""
    args = build_parser().parse_args(argv)
    bars = ProgressBars(enabled=not getattr(args, "quiet", False), terminal=sys.stderr.isatty(),
                        every_s=progress_seconds())
    status = run_command(args, bars)
    if argv is None or getattr(args, "ends_at_once", False):
        end_process(status)
    return status


def end_process(status: int) -> None:
    """End the process now with `status`, without the interpreter's teardown. Every command has written and
    closed its outputs (and stopped its embedded server) when it returns; what is left is freeing module by
    module what torch and scikit-learn loaded, about 0.5-1 s on a small CPU. Commands that start Java (Fiji)
    need it too: TWS's idle worker threads would keep a normal exit waiting, or abort it while Java shuts down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(args: argparse.Namespace, bars: ProgressBars) -> int:
    """Run the chosen command; its exit status (1 with one sentence for bad input or a failed read or write, 130
    when interrupted). Folders the command created for its outputs are removed again if it fails and they are empty."""
    try:
        with tidy_on_failure():
            args.run(args, bars)
    except DinofeatError as error:
        bars.close()
        print(f"dinofeat: error: {error}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:  # a write no write site caught (e.g. in a project's small files): one sentence
        if not is_write_error(error):
            raise
        bars.close()
        print(f"dinofeat: error: {io_failure(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print("dinofeat: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
