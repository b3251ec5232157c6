"""Volume commands: features, segment, apply and train into OME-Zarr, in this process or as Dask tasks (needs dinofeat[server,volumes])."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import output_file

from .. import server_part
from .common import backbone_weights, computation_from_args
from .progress import ProgressBars


def zarr_features(args: argparse.Namespace, bars: ProgressBars) -> None:
    """features -o OUT.zarr: OME-Zarr computed in this process, or as one Dask task per slice on the workers of
    --dask (which read the volume from the same path); needs dinofeat[server,volumes] (imported only here)."""
    volumes = zarr_run(args, "features")
    from .features import requested_computation

    computation, space = requested_computation(args)
    like = volumes.FeatureSpace.from_dict(json.loads(space)) if space else None
    weights = backbone_weights(args)
    with dask_or_here(args, volumes) as client:
        written = volumes.features_to_zarr(args.image, args.output, computation, device=args.device, weights=weights, client=client, like=like,
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
    return server_part.volumes()


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
    output_file(args.output)
    weights = backbone_weights(args)
    with dask_or_here(args, volumes) as client:
        _, trained = volumes.train_volume(args.images[0], args.labels[0], computation_from_args(args), kind=args.classifier, trees=args.trees, seed=args.seed, device=args.device,
                                          weights=weights, client=client, progress=bars)
    volumes.save_model(trained, args.output)
    bars.close()
    meta = trained.metadata
    print(f"wrote {args.output}: {args.classifier} on {meta['labelled_pixels']} labelled pixels, "
          f"classes {', '.join(str(v) for v in meta['class_values'])}")


def zarr_segment(args: argparse.Namespace, bars: ProgressBars) -> None:
    """segment VOLUME --labels LABELS -o OUT.zarr: train on the labelled slices, then write the label image."""
    volumes = zarr_run(args, "segment")
    weights = backbone_weights(args)
    with dask_or_here(args, volumes) as client:
        written = volumes.segment_to_zarr(args.image, args.labels, args.output, computation_from_args(args), kind=args.classifier, trees=args.trees, seed=args.seed,
                                          probabilities=args.probabilities, levels=args.pyramid, device=args.device,
                                          weights=weights, client=client, overwrite=args.overwrite, progress=bars)
    bars.close()
    print("wrote " + ", ".join(str(path) for path in written if path))
