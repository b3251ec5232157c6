"""The dinofeat dock widget: paint scribbles in napari and segment with a dinofeat server's features.

Every server call runs in a napari thread worker (the viewer never waits on the network), reports to napari's
progress bar and can be cancelled; live mode retrains and predicts after each finished stroke, debounced, and a
newer stroke cancels the prediction still running. The work itself is `jobs.py`, which scripts call directly.

Layers it makes: "<image> scribbles" (Labels, on request), "<image> classes" (Labels, the class map in the
scribbles' values) and "<image> probabilities" (Image, one plane per class). Stacks: the current slice first
(a model trained on every scribbled slice), the other slices with "Segment all slices". Lazy data (dask or zarr,
e.g. an OME-Zarr volume opened as a multiscale layer) is read one slice at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import napari
import numpy as np
from dinofeat.contract.computation import DEFAULT_BACKBONE, DEFAULT_PRESET, DEFAULT_SET, DEEP_SETS, PRESETS, UPSAMPLERS
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import CLASSIFIERS, DEFAULT_CLASSIFIER
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QSpinBox, QVBoxLayout, QWidget)

from dinofeat_client import SETS, FeatureClient, FeatureComputation

from . import jobs
from .jobs import Cancelled, Connection, Job, Segmentation

DEBOUNCE_MS = 300
"""Live mode waits this long after a stroke before it predicts, so a burst of strokes costs one prediction."""
BACKBONES = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg", "dinov2_vitb14_reg",
             "dinov2_vitl14_reg", "dinov2_vitg14_reg")
"""Offered in the backbone box (it also takes any name the server knows, e.g. a DINOv3 backbone)."""
IMAGE_KEY = "dinofeat_image"
"""Labels metadata: the name of the image layer whose scribbles these are."""
ROLE_KEY = "dinofeat_role"
"""Layer metadata: "scribbles", "classes" or "probabilities" for the layers this widget made."""


class ProgressRelay(QObject):
    """Carries a worker thread's progress to the main thread (a queued Qt signal), where napari's bar lives."""

    step = Signal(str, int, int)


class NoticeRelay(QObject):
    """Carries a server's notices from worker threads to napari's notifications in the main thread."""

    notice = Signal(str)


class DinofeatWidget(QWidget):
    """The dock widget; its methods (segment, save_model, apply_model, segment_all_slices) also serve scripts
    and tests, and return the started worker."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.jobs: list[Job] = []
        self.model: Path | None = None
        self._workers: list[FunctionWorker] = []
        self._current: tuple[Job, FunctionWorker] | None = None
        self.progress_bar: cancelable_progress | None = None
        """The running job's bar in napari's activity dock (its Cancel button cancels the job)."""
        self._client: tuple[Connection, FeatureClient] | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="dinofeat-napari-models-")
        self._watched: Any = None
        self._debounce = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._debounce.timeout.connect(self.segment)
        self._notices = NoticeRelay(self)
        self._notices.notice.connect(show_info)
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- the form -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        form = QFormLayout()
        self.server = QLineEdit(placeholderText="this user's local server")
        self.token_file = QLineEdit(placeholderText="token file (or $DINOFEAT_TOKEN)")
        self.tls_ca = QLineEdit(placeholderText="CA certificate for TLS")
        self.tls_cert = QLineEdit(placeholderText="client certificate (mutual TLS)")
        self.tls_key = QLineEdit(placeholderText="client key (mutual TLS)")
        self.feature_set = QComboBox()
        self.feature_set.addItems([s.name for s in SETS])
        self.feature_set.setCurrentText(DEFAULT_SET)
        self.backbone = QComboBox(editable=True)
        self.backbone.addItems(BACKBONES)
        self.backbone.setCurrentText(DEFAULT_BACKBONE)
        self.preset = QComboBox()
        self.preset.addItems(PRESETS)
        self.preset.setCurrentText(DEFAULT_PRESET)
        self.upsampler = QComboBox()
        self.upsampler.addItem("the preset's own", "")  # as --upsampler left out
        for name in UPSAMPLERS:
            self.upsampler.addItem(name, name)
        self.classifier = QComboBox()
        self.classifier.addItems(CLASSIFIERS)
        self.classifier.setCurrentText(DEFAULT_CLASSIFIER)
        self.seed = QSpinBox(maximum=2**31 - 1)
        self.image_layer = QComboBox()
        self.scribbles_layer = QComboBox()
        self.all_images = QCheckBox("train on every scribbled image")
        self.live = QCheckBox("live: predict after each stroke")
        for label, field in (("server", self.server), ("token", self.token_file), ("TLS CA", self.tls_ca),
                             ("TLS cert", self.tls_cert), ("TLS key", self.tls_key),
                             ("feature set", self.feature_set), ("backbone", self.backbone), ("preset", self.preset),
                             ("upsampler", self.upsampler),
                             ("classifier", self.classifier), ("seed", self.seed), ("image", self.image_layer),
                             ("scribbles", self.scribbles_layer)):
            form.addRow(label, field)
        self.new_scribbles = QPushButton("New scribbles")
        self.segment_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.all_slices = QPushButton("Segment all slices")
        self.save_button = QPushButton("Save model...")
        self.apply_button = QPushButton("Apply model...")
        self.status = QLabel(wordWrap=True)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for row in ((self.new_scribbles, self.segment_button, self.cancel_button), (self.all_slices,),
                    (self.save_button, self.apply_button)):
            line = QHBoxLayout()
            for button in row:
                line.addWidget(button)
            layout.addLayout(line)
        layout.addWidget(self.all_images)
        layout.addWidget(self.live)
        layout.addWidget(self.status)
        layout.addStretch()
        self.new_scribbles.clicked.connect(self.add_scribbles)
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button.clicked.connect(self.cancel)
        self.all_slices.clicked.connect(self.segment_all_slices)
        self.save_button.clicked.connect(self._ask_save)
        self.apply_button.clicked.connect(self._ask_apply)
        self.feature_set.currentTextChanged.connect(self._deep_fields)
        self.scribbles_layer.currentTextChanged.connect(self._watch_scribbles)
        self.live.toggled.connect(self._watch_scribbles)
        self._deep_fields(self.feature_set.currentText())

    def _deep_fields(self, name: str) -> None:
        """Backbone, preset and upsampler apply to the deep sets only, as on the command line."""
        for field in (self.backbone, self.preset, self.upsampler):
            field.setEnabled(name in DEEP_SETS)

    def _refresh_layers(self, event: Any = None) -> None:
        """The layer boxes list the viewer's image layers and the Labels layers that are not results."""
        for box, kind, role in ((self.image_layer, napari.layers.Image, "probabilities"),
                                (self.scribbles_layer, napari.layers.Labels, "classes")):
            chosen = box.currentText()
            names = [layer.name for layer in self.viewer.layers
                     if isinstance(layer, kind) and layer.metadata.get(ROLE_KEY) != role]
            box.blockSignals(True)
            box.clear()
            box.addItems(names)
            if chosen in names:
                box.setCurrentText(chosen)
            box.blockSignals(False)
        self._watch_scribbles()

    # -- what the form says ---------------------------------------------------------------------------------
    def computation(self) -> FeatureComputation:
        """The feature computation the form describes (the deep fields only for the deep sets)."""
        name = self.feature_set.currentText()
        if name in DEEP_SETS:
            return FeatureComputation(name, backbone=self.backbone.currentText(), preset=self.preset.currentText(),
                                      upsampler=self.upsampler.currentData())
        return FeatureComputation(name)

    def connection(self) -> Connection:
        return Connection(server=self.server.text().strip(), token_file=self.token_file.text().strip(),
                          tls_ca=self.tls_ca.text().strip(), tls_cert=self.tls_cert.text().strip(),
                          tls_key=self.tls_key.text().strip())

    def _layer(self, box: QComboBox, what: str):
        name = box.currentText()
        if not name or name not in self.viewer.layers:
            raise DinofeatError(f"choose {what} in the widget first (add one to the viewer if there is none).")
        return self.viewer.layers[name]

    def image(self) -> napari.layers.Image:
        return self._layer(self.image_layer, "an image layer")

    def scribbles(self) -> napari.layers.Labels:
        return self._layer(self.scribbles_layer, "a scribbles (Labels) layer, or press 'New scribbles'")

    # -- layers ---------------------------------------------------------------------------------------------
    def add_scribbles(self) -> napari.layers.Labels:
        """An empty Labels layer of the chosen image's shape, ready to paint label 1."""
        image = self.image()
        data = full_resolution(image)
        shape = data.shape[:-1] if image.rgb else data.shape
        layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=f"{image.name} scribbles",
                                       scale=image.scale[-len(shape):], translate=image.translate[-len(shape):],
                                       metadata={IMAGE_KEY: image.name, ROLE_KEY: "scribbles"})
        layer.mode = "paint"
        layer.selected_label = 1
        layer.brush_size = 5
        self.scribbles_layer.setCurrentText(layer.name)
        return layer

    def _watch_scribbles(self, *args: Any) -> None:
        """In live mode, a finished stroke on the chosen scribbles (re)starts the debounce timer."""
        if self._watched is not None:
            self._watched.events.paint.disconnect(self._stroke_finished)
            self._watched = None
        name = self.scribbles_layer.currentText()
        if self.live.isChecked() and name in self.viewer.layers:
            self._watched = self.viewer.layers[name]
            self._watched.events.paint.connect(self._stroke_finished)

    def _stroke_finished(self, event: Any = None) -> None:
        self._debounce.start()

    def show_result(self, image: napari.layers.Image, result: Segmentation, z: int | None = None) -> None:
        """The class map (a Labels layer; one slice of a stack's when `z` is given) and the probabilities."""
        classes_name, probabilities_name = f"{image.name} classes", f"{image.name} probabilities"
        data = full_resolution(image)
        shape = data.shape[:-1] if image.rgb else data.shape
        placement = {"scale": image.scale[-len(shape):], "translate": image.translate[-len(shape):]}
        if classes_name in self.viewer.layers and self.viewer.layers[classes_name].data.shape == shape:
            layer = self.viewer.layers[classes_name]
            if z is None:
                layer.data = result.class_map
            else:
                layer.data[z] = result.class_map
                layer.refresh()
        else:
            class_map = result.class_map if z is None else np.zeros(shape, result.class_map.dtype)
            if z is not None:
                class_map[z] = result.class_map
            if classes_name in self.viewer.layers:
                self.viewer.layers.remove(classes_name)
            self.viewer.add_labels(class_map, name=classes_name, opacity=0.5, metadata={ROLE_KEY: "classes"}, **placement)
        planes = placement if z is None else {key: value[-2:] for key, value in placement.items()}
        if probabilities_name in self.viewer.layers and self.viewer.layers[probabilities_name].data.shape == result.probabilities.shape:
            self.viewer.layers[probabilities_name].data = result.probabilities
        else:
            if probabilities_name in self.viewer.layers:
                self.viewer.layers.remove(probabilities_name)
            self.viewer.add_image(result.probabilities, name=probabilities_name, visible=False, contrast_limits=(0, 1),
                                  metadata={ROLE_KEY: "probabilities"}, scale=(1, *planes["scale"]),
                                  translate=(0, *planes["translate"]))

    # -- work -----------------------------------------------------------------------------------------------
    def say(self, sentence: str, error: bool = False) -> None:
        """One sentence in the widget and in napari's notifications (never a traceback)."""
        self.status.setText(sentence)
        (show_error if error else show_info)(sentence)

    def client(self, notify: Callable[[str], None]) -> FeatureClient:
        """The connected client for the form's connection, kept between jobs (called in worker threads)."""
        connection = self.connection()
        if self._client is None or self._client[0] != connection:
            if self._client is not None:
                self._client[1].close()
            self._client = (connection, connection.client(notify))
        return self._client[1]

    def cancel(self) -> None:
        """Cancel the running job (its server call ends at the server's next message)."""
        self._debounce.stop()
        if self._current is not None:
            self._current[0].cancel()  # not worker.quit(): a quit worker never reports, and the job's end is its outcome
            self._current = None

    def start(self, description: str, work: Callable[[Job], Any], done: Callable[[Any], None]) -> FunctionWorker | None:
        """Run `work(job)` in a thread worker after cancelling the running one; `done(result)` runs in the main thread
        unless a newer job replaced it. Progress goes to napari's progress bar; failures become one sentence."""
        self.cancel()
        bar = cancelable_progress(total=0, desc=description)  # its Cancel button in napari's activity dock
        relay = ProgressRelay()
        job = Job(relay.step.emit, description)

        def step(stage: str, done_count: int, total: int) -> None:
            if bar.is_canceled:  # napari's Cancel: the server's call ends at its next message
                job.cancel()
            if total and bar.total != total:
                bar.total = total
            bar.set_description(f"{description}: {stage}")
            bar.n = min(done_count, total) if total else done_count
            bar.refresh()

        relay.step.connect(step)
        self.progress_bar = bar
        worker = create_worker(guarded, work, job, description, _start_thread=False)

        def returned(outcome: tuple[str, Any]) -> None:
            job.outcome, value = ("cancelled", None) if job.cancelled else outcome
            if job.outcome == "done":
                done(value)
                self.status.setText(f"{description}: done.")
            elif job.outcome == "failed":
                self.say(value, error=True)

        def finished() -> None:
            if job.outcome == "running":
                job.outcome = "cancelled"
            bar.close()
            if self.progress_bar is bar:
                self.progress_bar = None
            relay.deleteLater()
            if self._current is not None and self._current[0] is job:
                self._current = None
            if worker in self._workers:
                self._workers.remove(worker)

        worker.returned.connect(returned)
        worker.finished.connect(finished)
        self.jobs.append(job)
        self._workers.append(worker)
        self._current = (job, worker)
        self.status.setText(f"{description}...")
        worker.start()
        return worker

    def _checked(self, prepare: Callable[[], Any]) -> Any:
        """`prepare()`, or None after its one sentence in the widget (bad input: nothing is sent or changed)."""
        try:
            return prepare()
        except DinofeatError as error:
            self.say(str(error), error=True)
            return None

    def segment(self) -> FunctionWorker | None:
        """Segment the chosen image (a stack: its current slice) from the scribbles; with 'train on every scribbled
        image', from the scribbles of every image that has some."""
        plan = self._checked(self._segment_plan)
        return self.start(*plan) if plan else None

    def _segment_plan(self):
        image, computation, classifier, seed = self.image(), self.computation(), self.classifier.currentText(), self.seed.value()
        data = full_resolution(image)
        if is_stack(image) or self.all_images.isChecked():
            pairs = self.training_pairs()
            images, scribbles = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
            jobs.check_classes(scribbles)
            z = self.current_slice(image) if is_stack(image) else None
            target = np.asarray(data[z]) if z is not None else np.asarray(data)
            model = Path(self._folder.name) / "model.dfm"

            def work(job: Job) -> Segmentation:
                client = self.client(self.status_notice)
                jobs.train(client, images, scribbles, computation, model, classifier=classifier, seed=seed, job=job)
                return jobs.apply(client, model, target, job=job)

            def done(result: Segmentation) -> None:
                self.model = model  # what 'Segment all slices' applies
                self.show_result(image, result, z)

            where = f" (slice {z})" if z is not None else ""
            return f"segmenting {image.name}{where}", work, done
        scribbles = jobs.checked_scribbles(np.asarray(data), self.scribbles().data, image.name, self.scribbles().name)
        target = np.asarray(data)

        def work(job: Job) -> Segmentation:
            return jobs.segment(self.client(self.status_notice), target, scribbles, computation, classifier=classifier,
                                seed=seed, job=job)

        return f"segmenting {image.name}", work, lambda result: self.show_result(image, result)

    def status_notice(self, message: str) -> None:
        """A server's notice (a started local server, a long computation's estimate), from any thread."""
        self._notices.notice.emit(message)

    def training_pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image, scribbles) of every scribbled image: each stack slice with scribbles counts as one image; with
        'train on every scribbled image', every Labels layer that 'New scribbles' made for an image layer."""
        layers = [self.scribbles()]
        if self.all_images.isChecked():
            layers += [layer for layer in self.viewer.layers if isinstance(layer, napari.layers.Labels)
                       and layer.metadata.get(ROLE_KEY) == "scribbles" and layer is not layers[0]]
        images = [self.image()] + [self.viewer.layers[layer.metadata.get(IMAGE_KEY)] if layer.metadata.get(IMAGE_KEY)
                                   in self.viewer.layers else None for layer in layers[1:]]
        pairs = []
        for image, scribbles in zip(images, layers):
            if image is None:  # its image layer was removed or renamed
                continue
            data = full_resolution(image)
            labels = jobs.shaped_scribbles(data, np.asarray(scribbles.data), image.name, scribbles.name)
            if is_stack(image):
                pairs += [(np.asarray(data[z]), labels[z]) for z in range(labels.shape[0]) if labels[z].any()]
            elif labels.any():
                pairs.append((np.asarray(data), labels))
        if not pairs:
            raise DinofeatError(f"{self.scribbles().name} are empty; paint a few strokes of at least two classes first.")
        return pairs

    def current_slice(self, image: napari.layers.Image) -> int:
        """The slice of a stack that the viewer shows."""
        return int(np.clip(round(image.world_to_data(self.viewer.dims.point)[0]), 0, full_resolution(image).shape[0] - 1))

    def save_model(self, path: str | Path) -> FunctionWorker | None:
        """Train on the scribbled images and save a model file that `dinofeat apply` reads."""
        plan = self._checked(self.training_pairs)
        if plan is None:
            return None
        computation, classifier, seed = self.computation(), self.classifier.currentText(), self.seed.value()
        images, scribbles = [pair[0] for pair in plan], [pair[1] for pair in plan]
        if self._checked(lambda: jobs.check_classes(scribbles) or True) is None:
            return None

        def work(job: Job) -> Path:
            return jobs.train(self.client(self.status_notice), images, scribbles, computation, path, classifier=classifier,
                              seed=seed, job=job)

        def saved(model: Path) -> None:
            self.model = Path(model)
            self.say(f"saved the model to {model}; `dinofeat apply {model} IMAGE` applies it.")

        return self.start(f"training a model for {path}", work, saved)

    def apply_model(self, path: str | Path, layer: napari.layers.Image | None = None) -> FunctionWorker | None:
        """Apply a model file to an image layer (the chosen one by default; a stack: its current slice)."""
        image = layer if layer is not None else self._checked(self.image)
        if image is None:
            return None
        self.model = Path(path)
        data = full_resolution(image)
        z = self.current_slice(image) if is_stack(image) else None
        target = np.asarray(data[z] if z is not None else data)

        def work(job: Job) -> Segmentation:
            return jobs.apply(self.client(self.status_notice), path, target, job=job)

        return self.start(f"applying {Path(path).name} to {image.name}", work, lambda result: self.show_result(image, result, z))

    def segment_all_slices(self) -> FunctionWorker | None:
        """Apply the latest model (trained by Segment, saved or loaded) to every slice of the chosen stack, one
        slice at a time (lazy data stays lazy); each finished slice appears at once, a cancel keeps them."""
        image = self._checked(self.image)
        if image is None:
            return None
        if not is_stack(image):
            self.say(f"{image.name} is not a stack; use Segment.", error=True)
            return None
        if self.model is None:
            self.say("segment the current slice first (or apply a model), so that there is a model for the other slices.", error=True)
            return None
        data, model = full_resolution(image), self.model
        classes_name = f"{image.name} classes"
        if classes_name not in self.viewer.layers or self.viewer.layers[classes_name].data.shape != data.shape:
            if classes_name in self.viewer.layers:
                self.viewer.layers.remove(classes_name)
            self.viewer.add_labels(np.zeros(data.shape, np.uint16), name=classes_name, opacity=0.5, metadata={ROLE_KEY: "classes"},
                                   scale=image.scale, translate=image.translate)
        layer = self.viewer.layers[classes_name]
        target = layer.data
        relay = ProgressRelay()
        relay.step.connect(lambda stage, z, total: layer.refresh())

        def work(job: Job) -> np.ndarray:
            client = self.client(self.status_notice)
            total = data.shape[0]

            def slice_done(z: int) -> None:
                job.progress("slices", z + 1, total)
                relay.step.emit("slice", z, total)

            return jobs.apply_slices(client, model, data, target, job=job, done=slice_done)

        return self.start(f"segmenting every slice of {image.name}", work, lambda result: layer.refresh())

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the model", "model.dfm", "dinofeat models (*.dfm)")
        if path:
            self.save_model(path)

    def _ask_apply(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Apply a model", "", "dinofeat models (*.dfm)")
        if path:
            self.apply_model(path)


def guarded(work: Callable[[Job], Any], job: Job, description: str) -> tuple[str, Any]:
    """Run `work(job)` in a worker thread and return ("done", result), ("cancelled", None) or ("failed", sentence):
    nothing escapes, since napari shows a worker's exception as a traceback notification."""
    try:
        return "done", work(job)
    except Cancelled:
        return "cancelled", None
    except DinofeatError as error:
        return "failed", str(error)
    except Exception as error:  # noqa: BLE001 - an unexpected failure still gets one line, not a traceback dialog
        return "failed", f"{description} failed ({type(error).__name__}: {error})."


def full_resolution(layer: napari.layers.Image):
    """A layer's full-resolution data: level 0 of a multiscale (lazy) layer, else its data."""
    return layer.data[0] if layer.multiscale else layer.data


def is_stack(layer: napari.layers.Image) -> bool:
    """Whether a layer holds slices (Z, Y, X), as opposed to one greyscale or RGB image."""
    return full_resolution(layer).ndim == (4 if layer.rgb else 3)
