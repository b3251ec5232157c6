"""What the napari widget asks a dinofeat server to do, without Qt or napari: scriptable, and no torch.

Every function takes a `FeatureClient` (see `Connection.client`) and numpy arrays as napari layers hold them
((Y, X), (Y, X, 3) RGB, or (Z, Y, X) stacks; labels: 0 = unlabelled, any other value = a class), and returns
arrays: a script does what the widget does with the same calls.

    with Connection().client() as client:            # this user's local server, as `dinofeat` commands use
        result = segment(client, image, scribbles, FeatureComputation("multiscale"))
        result.class_map, result.probabilities       # (Y, X) in the scribbles' values, (C, Y, X) float

Results travel as the files the command line writes (a class-map TIFF and a probabilities HDF5 in a temporary
folder), so the widget's numbers are `dinofeat segment`'s and `dinofeat apply`'s. A `Job` is cancelled from
another thread: its progress callback raises `Cancelled` at the server's next message, which ends the call (the
server stops the work of a client that went away).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import DEFAULT_CLASSIFIER

from dinofeat_client import FeatureClient, FeatureComputation, local_server
from dinofeat_client.client import PLAINTEXT_TOKEN_VARIABLE

Report = Callable[[str, int, int], None]
"""progress(stage, done, total), as FeatureClient's `progress` callbacks."""


class Cancelled(Exception):
    """A job was cancelled (a newer stroke, the Cancel button): not an error, nothing to show."""


class Job:
    """One request's cancel flag and progress relay; `progress` is the callback the client calls. `outcome` is
    "running", then "done", "cancelled" or "failed" (set by whoever runs it)."""

    def __init__(self, report: Report | None = None, description: str = ""):
        self._cancelled = threading.Event()
        self._report = report
        self.description = description
        self.outcome = "running"

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled once the job was cancelled (between steps, and at every message of the server)."""
        if self._cancelled.is_set():
            raise Cancelled()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.check()
        if self._report:
            self._report(stage, done, total)


@dataclass(frozen=True)
class Connection:
    """Where the features are computed: `server` HOST:PORT with the CLI's token and TLS options, or "" for this
    user's local server (started on first use, shared with `dinofeat` commands; needs dinofeat[server] here)."""

    server: str = ""
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    insecure_token: bool = False

    def address(self, notify: Callable[[str], None]) -> str:
        """The server's address; the local server's is found, or started, as the command line does (cli/common.py)."""
        if self.server:
            return self.server
        if not local_server.wanted():
            raise DinofeatError("the local server is turned off here (DINOFEAT_LOCAL_SERVER=0); type a server's HOST:PORT "
                                "in the widget's Server field, or unset DINOFEAT_LOCAL_SERVER.")
        address = local_server.local_address("auto", None, notify=notify)
        if not address:
            raise DinofeatError("no local dinofeat server can run here (it needs dinofeat[server] on this machine); "
                                "type a server's HOST:PORT in the widget's Server field.")
        return address

    def client(self, notify: Callable[[str], None] = lambda message: None) -> FeatureClient:
        """A connected FeatureClient (one sentence when the server is down, refuses TLS or the token is unreadable)."""
        from dinofeat.contract.tokens import read_tokens

        token = read_tokens(self.token_file)[0] if self.token_file else os.environ.get("DINOFEAT_TOKEN")
        insecure = self.insecure_token or os.environ.get(PLAINTEXT_TOKEN_VARIABLE, "").lower() in ("1", "true", "yes", "on")
        return FeatureClient(self.address(notify), token=token, tls_ca=self.tls_ca or None, tls_cert=self.tls_cert or None,
                             tls_key=self.tls_key or None, notify=notify, insecure_token=insecure, retries=1)


@dataclass(frozen=True)
class Segmentation:
    """A class map in the scribbles' values ((Y, X) or (Z, Y, X)) and per-class probabilities ((C, ...) float32)."""

    class_map: np.ndarray
    probabilities: np.ndarray
    class_values: tuple[int, ...]


def checked_scribbles(image: np.ndarray, scribbles: np.ndarray, image_name: str = "the image",
                      scribbles_name: str = "the scribbles") -> np.ndarray:
    """The scribbles as an integer array of the image's shape, with two classes or more, or one sentence saying
    what to change (nothing is sent, and nothing in the layers changes)."""
    checked = shaped_scribbles(image, scribbles, image_name, scribbles_name)
    check_classes([checked], scribbles_name)
    return checked


def shaped_scribbles(image: np.ndarray, scribbles: np.ndarray, image_name: str = "the image",
                     scribbles_name: str = "the scribbles") -> np.ndarray:
    """The scribbles as an integer array, or one sentence when their shape is not the image's."""
    spatial = image.shape[:-1] if is_rgb(image) else image.shape
    if scribbles.shape != spatial:
        raise DinofeatError(f"{scribbles_name} have shape {'x'.join(map(str, scribbles.shape))} but {image_name} has "
                            f"{'x'.join(map(str, spatial))}; paint in a Labels layer made with 'New scribbles' for this image.")
    wide = scribbles.dtype.kind not in "ui" or scribbles.itemsize > 4
    return np.ascontiguousarray(scribbles, dtype=np.int32 if wide else scribbles.dtype)


def check_classes(scribbles: list[np.ndarray], scribbles_name: str = "the scribbles") -> None:
    """One sentence unless the scribbles, together, hold two classes or more."""
    values = np.unique(np.concatenate([np.unique(s) for s in scribbles]))
    classes = values[values != 0]
    if classes.size == 0:
        raise DinofeatError(f"{scribbles_name} are empty; paint a few strokes of at least two classes (label 1, label 2) first.")
    if classes.size == 1:
        raise DinofeatError(f"{scribbles_name} have one class only (label {classes[0]}); paint a second class, "
                            "e.g. the background with another label.")


def is_rgb(image: np.ndarray) -> bool:
    """Whether the last axis holds colours (RGB or RGBA), as the client's image axes read it."""
    return image.ndim in (3, 4) and image.shape[-1] in (3, 4)


@contextmanager
def scratch() -> Iterator[Path]:
    """A private temporary folder for one request's result files, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dinofeat-napari-") as folder:
        yield Path(folder)


def read_segmentation(class_map: Path, probabilities: Path) -> Segmentation:
    with h5py.File(probabilities, "r") as f:
        dataset = f["probabilities"]
        values = tuple(int(v) for v in dataset.attrs["class_values"])
        probs = dataset[()].astype(np.float32, copy=False)
    return Segmentation(tifffile.imread(class_map), probs, values)


def segment(client: FeatureClient, image: np.ndarray, scribbles: np.ndarray, computation: FeatureComputation,
            *, classifier: str = DEFAULT_CLASSIFIER, seed: int = 0, job: Job | None = None) -> Segmentation:
    """Train on the scribbles of `image` and predict every pixel: `dinofeat segment IMAGE --labels SCRIBBLES`."""
    job = job or Job()
    scribbles = checked_scribbles(image, scribbles)
    job.check()
    with scratch() as folder:
        output, probabilities = folder / "classes.tif", folder / "probabilities.h5"
        client.segment(image, scribbles, output, computation, probabilities=probabilities, seed=seed,
                       classifier=classifier, progress=job.progress)
        return read_segmentation(output, probabilities)


def train(client: FeatureClient, images: list[np.ndarray], scribbles: list[np.ndarray], computation: FeatureComputation,
          output: str | Path, *, classifier: str = DEFAULT_CLASSIFIER, seed: int = 0, job: Job | None = None) -> Path:
    """Train one model on the scribbles of several images (one feature space fitted over all of them) and save it
    as a model file that `dinofeat apply` reads: `dinofeat train IMAGE... --labels SCRIBBLES... -o MODEL.dfm`."""
    job = job or Job()
    checked = [shaped_scribbles(i, s, f"image {n + 1}", f"the scribbles of image {n + 1}") for n, (i, s) in enumerate(zip(images, scribbles))]
    check_classes(checked)
    job.check()
    client.train(images, checked, output, computation, classifier=classifier, seed=seed, progress=job.progress)
    return Path(output)


def apply(client: FeatureClient, model: str | Path, image: np.ndarray, *, job: Job | None = None) -> Segmentation:
    """Apply a saved model file to an image (2-D or a stack): `dinofeat apply MODEL.dfm IMAGE`."""
    job = job or Job()
    with scratch() as folder:
        output, probabilities = folder / "classes.tif", folder / "probabilities.h5"
        client.apply(model, image, output, probabilities=probabilities, progress=job.progress)
        return read_segmentation(output, probabilities)


def apply_slices(client: FeatureClient, model: str | Path, volume, class_map: np.ndarray, *, job: Job | None = None,
                 slices: list[int] | None = None, done: Callable[[int], None] = lambda z: None) -> np.ndarray:
    """Apply a model to a stack slice by slice into `class_map` (Z, Y, X): `volume` may be lazy (a dask or zarr
    array: one slice is read at a time), so memory holds one slice and the class map; `done(z)` follows each slice,
    and a cancelled job stops between slices with the finished ones kept."""
    job = job or Job()
    for z in slices if slices is not None else range(volume.shape[0]):
        job.check()
        plane = np.asarray(volume[z])
        class_map[z] = apply(client, model, plane, job=job).class_map
        done(z)
    return class_map
