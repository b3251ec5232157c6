"""Features of a volume into OME-Zarr, computed as Dask tasks on `dask.distributed` workers (or in this process).

A run: the client opens the volume's description (shape, type; no pixels), checks that every worker can
read the volume and has the weights, fits the feature space in one task (on a worker, which has the model
and the data), creates the empty store, sends the fitted space to every worker once (`scatter(broadcast=
True)`), and submits one task per slice. Each task reads its plane from the shared path and writes its
own chunks into the store; only (slice, seconds) comes back. A worker that dies is replaced by its nanny
and its slices run again elsewhere (the scheduler's `distributed.scheduler.allowed-failures`, default 3,
bounds how often one slice may take a worker down); slices are idempotent, so nothing is lost or doubled.

Security: Dask has no authentication of its own. A `tls://` scheduler address takes a `distributed.Security`
(`dask_security` builds it from the CLI's --dask-tls-ca/-cert/-key PEM files, requiring encryption) or
distributed's own TLS settings (`distributed.comm.tls.ca-file`, `.client.cert`, `.client.key`: a config file
or DASK_DISTRIBUTED__COMM__TLS__... environment variables); a scheduler without TLS belongs on a trusted
network only.

`each_slice` runs any per-slice task this way (features here, a classifier's labels in `classify`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from pathlib import Path

from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.errors import DinofeatError

from ..engine.space import FeatureSpace
from ..engine.stacks import feature_set as check_set
from .sources import VolumeSource, absolute_name, open_volume
from .tasks import FeatureRequest, FittedVolume, fit_volume, source_problem, weights_problem, write_slice
from .zarr_io import checked_output, create_feature_store, finish_store, partial_path

CONNECT_SECONDS = 5
"""How long to wait for a scheduler before saying it cannot be reached."""
Progress = Callable[[str, int, int], None]
Result = TypeVar("Result")


@contextlib.contextmanager
def dask_client(address: str, workers: int = 0, security=None, connect_seconds: float = CONNECT_SECONDS) -> Iterator:
    """A `distributed.Client` of the scheduler at `address`, or of a new LocalCluster of `workers` processes with
    one thread each ("local"; 0: one per CPU core), closed (with the cluster) afterwards. A scheduler that does not
    answer is one sentence naming the time really waited (distributed may wait longer than its timeout: name
    resolution, a blackholed address, a busy machine)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DinofeatError("--dask needs dask and distributed; install dinofeat[server,volumes].") from None
    if address == "local":
        if security is not None:
            raise DinofeatError("TLS secures a scheduler on the network; a local cluster runs without it.")
        with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client
        return
    if workers:
        raise DinofeatError("--dask-workers sizes a local cluster; with a scheduler address, start the workers on their "
                            "machines (dask worker ADDRESS).")
    began = time.monotonic()
    try:
        client = Client(address, timeout=connect_seconds, security=security)
    except (OSError, TimeoutError, ValueError) as error:
        waited = time.monotonic() - began
        raise DinofeatError(f"cannot reach the Dask scheduler at {address} within {waited:.0f} s ({type(error).__name__}); "
                            "check the address (tcp://HOST:8786, or tls://... with --dask-tls-ca/-cert/-key for a TLS scheduler), "
                            "that `dask scheduler` runs there, or use --dask local.") from None
    with client:
        yield client


def dask_security(address: str, ca: str | None = None, cert: str | None = None, key: str | None = None):
    """The `distributed.Security` of a tls:// scheduler from the CA, client certificate and key files (PEM), or None
    (a tcp:// scheduler, or TLS set in distributed's own configuration); a mismatch of scheme and files is one sentence."""
    given = [name for name, value in (("--dask-tls-ca", ca), ("--dask-tls-cert", cert), ("--dask-tls-key", key)) if value]
    if not address.startswith("tls://"):
        if given:
            raise DinofeatError(f"{', '.join(given)} secure a tls:// scheduler, but {address} is not one; give its tls:// "
                                "address (dask scheduler --tls-ca-file ... listens on tls://), or leave them out.")
        return None
    if not given:
        import dask

        if dask.config.get("distributed.comm.tls.ca-file", None):
            return None  # distributed's configuration (a file or DASK_DISTRIBUTED__COMM__TLS__... variables) has it
        raise DinofeatError(f"{address} is a TLS scheduler: give --dask-tls-ca, --dask-tls-cert and --dask-tls-key (PEM "
                            "files: the CA that signed the scheduler's certificate, this client's certificate and its key).")
    if len(given) < 3:
        raise DinofeatError(f"a TLS scheduler needs all of --dask-tls-ca, --dask-tls-cert and --dask-tls-key; only "
                            f"{', '.join(given)} given.")
    for path in (ca, cert, key):
        if not Path(path).is_file():
            raise DinofeatError(f"cannot read the TLS file {path}: no such file.")
    from distributed import Security

    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


def request_for(volume: str | os.PathLike | VolumeSource, computation: FeatureComputation, device: str,
                weights: dict[str, str] | None) -> FeatureRequest:
    """A request with absolute paths (workers may start elsewhere than the client); an unknown set is refused here."""
    computation = computation.checked()
    check_set(computation.feature_set)
    source = volume if isinstance(volume, VolumeSource) else open_volume(
        volume if not isinstance(volume, (str, os.PathLike)) else absolute_name(volume))
    absolute = tuple(sorted((k, os.path.abspath(v)) for k, v in (weights or {}).items()))
    return FeatureRequest(source, computation, device, absolute)


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


def fitted_on(client, fit: Callable[..., FittedVolume], *arguments, report: Progress | None = None) -> FittedVolume:
    """`fit(*arguments)` (`fit_volume` or a variant): in this process without a client, else in one task on a worker
    (which has the data and the model), reported as the stage "fitting the feature space"."""
    report = report or (lambda stage, done, total: None)
    report("fitting the feature space", 0, 1)
    fitted = fit(*arguments) if client is None else client.submit(fit, *arguments, pure=False).result()
    report("fitting the feature space", 1, 1)
    return fitted


def features_to_zarr(volume: str | os.PathLike | VolumeSource, output: str | os.PathLike,
                     computation: FeatureComputation = FeatureComputation(), *, device: str = "auto", weights: dict[str, str] | None = None,
                     client=None, like: FeatureSpace | None = None, overwrite: bool = False,
                     progress: Progress | None = None) -> Path:
    """Compute the features `computation` describes of a volume (a path every worker reads: TIFF stack, OME-Zarr, HDF5) into the
    OME-Zarr store `output`, one task per slice.

    Parameters
    ----------
    volume : path or VolumeSource
        The volume (Z, Y, X) or (Z, Y, X, 3), or a 2-D image.
    output : path
        The store to write, named .zarr. An existing dinofeat store is replaced; anything else only with `overwrite`.
    computation : FeatureComputation, optional
        The whole feature computation (set, backbone, preset, PCA, normalisation, input range); default: the
        multiscale bank, as the command line's.
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
    request = request_for(volume, computation, device, weights)
    if client is not None:
        check_workers(client, request)
    report = progress or (lambda stage, done, total: None)
    fitted = fitted_on(client, fit_volume, request, like, report=report)
    partial = partial_path(output)
    create_feature_store(partial, fitted.shape, fitted.channel_names, fitted.attributes)
    each_slice(client, write_slice, fitted, request.source.planes, report, store=str(partial))
    return finish_store(partial, output)


def each_slice(client, task: Callable[..., Result], shared: object, planes: int, report: Progress, stage: str = "slices",
               **arguments) -> list[Result]:
    """`task(z, shared, **arguments)` for every slice z, reported as `stage`: in this process one after the other
    without a client, else one Dask task per slice with `shared` sent to every worker once. The results in slice order."""
    report(stage, 0, planes)
    if client is None:
        results = []
        for z in range(planes):
            results.append(task(z, shared, **arguments))
            report(stage, z + 1, planes)
        return results
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    sent = client.scatter(shared, broadcast=True, hash=False)
    futures = client.map(task, range(planes), [sent] * planes, pure=False, **arguments)
    slice_of = {future.key: z for z, future in enumerate(futures)}
    results: list = [None] * planes
    try:
        for number, future in enumerate(as_completed(futures), 1):
            results[slice_of[future.key]] = future.result()
            report(stage, number, planes)
        return results
    except KilledWorker as error:
        raise DinofeatError(f"one slice's task ({error.task}) ended its worker each time it ran; the workers may lack "
                            "memory for a slice: give them more, or use a lighter preset.") from None
    finally:
        for future in futures:
            future.release()
