"""Features of a volume into OME-Zarr, computed as Dask tasks on `dask.distributed` workers (or in this process).

A run: the client opens the volume's description (shape, type; no pixels), checks that every worker can
read the volume and has the weights, fits the feature space in one task (on a worker, which has the model
and the data), creates the empty store, sends the fitted space to every worker once (`scatter(broadcast=
True)`), and submits one task per slice. Each task reads its plane from the shared path and writes its
own chunks into the store; only (slice, seconds) comes back. A worker that dies is replaced by its nanny
and its slices run again elsewhere (the scheduler's `distributed.scheduler.allowed-failures`, default 3,
bounds how often one slice may take a worker down); slices are idempotent, so nothing is lost or doubled.

Security: Dask has no authentication of its own. A `tls://` scheduler address uses distributed's TLS
settings (`distributed.comm.tls.ca-file`, `.client.cert`, `.client.key`, `.require-encryption`: a
config file or DASK_DISTRIBUTED__COMM__TLS__... environment variables) or a `distributed.Security`
passed as `security`; a scheduler without TLS belongs on a trusted network only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dinofeat_client.errors import DinofeatError

from ..engine.space import FeatureSpace
from ..engine.stacks import FeatureOptions
from ..engine.stacks import feature_set as check_set
from .sources import VolumeSource, open_volume
from .tasks import FeatureRequest, FittedVolume, fit_volume, source_problem, weights_problem, write_slice
from .zarr_io import checked_output, create_feature_store, finish_store, partial_path

CONNECT_SECONDS = 5
"""How long to wait for a scheduler before saying it cannot be reached."""
Progress = Callable[[str, int, int], None]


@contextlib.contextmanager
def dask_client(address: str, workers: int = 0, security=None) -> Iterator:
    """A `distributed.Client` of the scheduler at `address`, or of a new LocalCluster of `workers` processes with
    one thread each ("local"; 0: one per CPU core), closed (with the cluster) afterwards."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DinofeatError("--dask needs dask and distributed; install dinofeat[server,volumes].") from None
    if address == "local":
        with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client
        return
    if workers:
        raise DinofeatError("--dask-workers sizes a local cluster; with a scheduler address, start the workers on their "
                            "machines (dask worker ADDRESS).")
    try:
        client = Client(address, timeout=CONNECT_SECONDS, security=security)
    except (OSError, TimeoutError, ValueError) as error:
        raise DinofeatError(f"cannot reach the Dask scheduler at {address} within {CONNECT_SECONDS} s ({type(error).__name__}); "
                            "check the address (tcp://HOST:8786 or tls://...), that `dask scheduler` runs there, "
                            "or use --dask local.") from None
    with client:
        yield client


def request_for(volume: str | os.PathLike | VolumeSource, feature_set: str, options: FeatureOptions, device: str,
                weights: dict[str, str] | None) -> FeatureRequest:
    """A request with absolute paths (workers may start elsewhere than the client); an unknown set is refused here."""
    check_set(feature_set)
    source = volume if isinstance(volume, VolumeSource) else open_volume(
        volume if not isinstance(volume, (str, os.PathLike)) else os.path.abspath(volume))
    absolute = tuple(sorted((k, os.path.abspath(v)) for k, v in (weights or {}).items()))
    return FeatureRequest(source, feature_set, options, device, absolute)


def check_workers(client, request: FeatureRequest) -> None:
    """One sentence naming the first worker that cannot read the volume or lacks the weights."""
    workers = client.scheduler_info()["workers"]
    if not workers:
        raise DinofeatError("the Dask scheduler has no workers; start some (dask worker ADDRESS) and run again.")
    for address, problem in sorted(client.run(source_problem, request.source).items()):
        if problem:
            raise DinofeatError(f"worker {address} cannot read {request.source.path}: {problem}; put the volume where every "
                                "worker reads it under the same path.")
    for address, problem in sorted(client.run(weights_problem, request).items()):
        if problem:
            raise DinofeatError(f"worker {address} {problem}; give every worker the same weights file (--weights PATH on "
                                "shared storage, or DINOFEAT_WEIGHTS in the workers' environment).")


def fitted_on(client, request: FeatureRequest, like: FeatureSpace | None) -> FittedVolume:
    """The fitted volume: in this process without a client, else in one task on a worker."""
    if client is None:
        return fit_volume(request, like)
    return client.submit(fit_volume, request, like, pure=False).result()


def features_to_zarr(volume: str | os.PathLike | VolumeSource, output: str | os.PathLike, feature_set: str = "classical", *,
                     options: FeatureOptions = FeatureOptions(), device: str = "auto", weights: dict[str, str] | None = None,
                     client=None, like: FeatureSpace | None = None, overwrite: bool = False,
                     progress: Progress | None = None) -> Path:
    """Compute `feature_set` of a volume (a path every worker reads: TIFF stack, OME-Zarr, HDF5) into the
    OME-Zarr store `output`, one task per slice.

    Parameters
    ----------
    volume : path or VolumeSource
        The volume (Z, Y, X) or (Z, Y, X, 3), or a 2-D image.
    output : path
        The store to write, named .zarr. An existing dinofeat store is replaced; anything else only with `overwrite`.
    feature_set : str, optional
        A name of `engine.stacks.FEATURE_SETS` (default "classical").
    options : FeatureOptions, optional
        Backbone, preset, PCA and normalisation of the deep sets.
    device : str, optional
        auto, cpu or cuda[:N], resolved on each worker.
    weights : dict, optional
        Backbone name (or "*") -> weights file, a path on the workers.
    client : distributed.Client, optional
        Where the tasks run; None: in this process, slice after slice.
    like : FeatureSpace, optional
        A space fitted earlier (checked against these features) instead of fitting one.
    progress : callable, optional
        Called as progress(stage, done, total).

    Returns
    -------
    Path
        The complete store: features (C, Z, Y, X) or (C, Y, X) float32 in its array "0".
    """
    output = checked_output(output, overwrite)
    request = request_for(volume, feature_set, options, device, weights)
    if client is not None:
        check_workers(client, request)
    report = progress or (lambda stage, done, total: None)
    report("fitting the feature space", 0, 1)
    fitted = fitted_on(client, request, like)
    report("fitting the feature space", 1, 1)
    partial = partial_path(output)
    create_feature_store(partial, fitted.shape, fitted.channel_names, fitted.attributes)
    planes = request.source.planes
    report("slices", 0, planes)
    if client is None:
        for z in range(planes):
            write_slice(z, fitted, str(partial))
            report("slices", z + 1, planes)
    else:
        run_slices(client, fitted, partial, lambda done: report("slices", done, planes))
    return finish_store(partial, output)


def run_slices(client, fitted: FittedVolume, store: Path, done: Callable[[int], None]) -> None:
    """One task per slice on the cluster; returns when every slice is written, or raises the first failure."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    shared = client.scatter(fitted, broadcast=True, hash=False)
    futures = client.map(write_slice, range(fitted.request.source.planes), fitted=shared, store=str(store), pure=False)
    try:
        for number, future in enumerate(as_completed(futures), 1):
            future.result()
            done(number)
    except KilledWorker as error:
        raise DinofeatError(f"one slice's task ({error.task}) ended its worker each time it ran; the workers may lack "
                            "memory for a slice: give them more, or use a lighter preset.") from None
    finally:
        for future in futures:
            future.release()
