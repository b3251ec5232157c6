"""The napari plugin (clients/dinofeat_napari): headless napari (Qt offscreen) on the session's real in-process server.

The widget docks in napari's own test viewer (make_napari_viewer); the tests that add layers run it on napari's
viewer model, as a canvas needs OpenGL (the screenshot test runs a whole viewer on a virtual X display). They
paint or load real scribbles, wait for the thread workers and compare with what the `dinofeat` command line computes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
napari = pytest.importorskip("napari", reason="the napari extra is not installed (pip install dinofeat[napari])")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (the dev extra)")

from conftest import ROOT, InProcessServer, free_port, run_cli  # noqa: E402
from dinofeat_client import FeatureComputation  # noqa: E402
from dinofeat_client.metrics import mean_iou  # noqa: E402
from dinofeat_napari.widget import DinofeatWidget  # noqa: E402
from napari.utils.notifications import notification_manager  # noqa: E402

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def isb(isb_three_phase: Path) -> dict[str, np.ndarray]:
    return {part: tifffile.imread(isb_three_phase / f"{part}.tif") for part in ("image", "scribbles", "ground_truth")}


@pytest.fixture
def widget(qtbot, inprocess_address) -> DinofeatWidget:
    """The widget on napari's viewer model (layers, dims: what the widget uses; no canvas, which needs OpenGL
    that Qt's offscreen platform lacks), talking to the session's in-process server."""
    from napari.components import ViewerModel

    dock = DinofeatWidget(ViewerModel())
    qtbot.addWidget(dock)
    dock.server.setText(inprocess_address)
    yield dock
    dock.cancel()
    qtbot.waitUntil(lambda: not dock._workers, timeout=WAIT_MS)


def finish(qtbot, widget: DinofeatWidget, count: int | None = None) -> None:
    """Wait until every job the widget started (at least `count` of them) has ended."""
    def ended() -> None:
        assert len(widget.jobs) >= (count or 1) and all(job.outcome != "running" for job in widget.jobs) and not widget._workers, \
            f"jobs {[job.outcome for job in widget.jobs]}, workers {len(widget._workers)}, status {widget.status.text()!r}"

    qtbot.waitUntil(ended, timeout=WAIT_MS)


def with_scribbles(widget: DinofeatWidget, image: np.ndarray, scribbles: np.ndarray, name: str = "isb"):
    """An image layer and its scribbles made with the widget's 'New scribbles', filled with `scribbles`."""
    widget.viewer.add_image(image, name=name)
    widget.image_layer.setCurrentText(name)
    layer = widget.add_scribbles()
    layer.data = scribbles
    return layer


def test_the_manifest_validates_and_is_the_installed_entry_point():
    from importlib.metadata import entry_points

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "clients" / "dinofeat_napari" / "napari.yaml")
    manifest.validate_imports()
    assert [w.display_name for w in manifest.contributions.widgets] == ["dinofeat segmentation"]
    assert [e.value for e in entry_points(group="napari.manifest") if e.name == "dinofeat"] == ["dinofeat_napari:napari.yaml"]


def test_the_plugin_imports_without_torch():
    script = ("import sys, dinofeat_napari.widget, dinofeat_napari.jobs, dinofeat_napari.sample, dinofeat_napari.reader; "
              "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.stdout.strip() == "ok", run.stderr


def test_the_widget_docks_from_the_plugin_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("dinofeat", "dinofeat segmentation")
    assert isinstance(dock, DinofeatWidget)
    assert (dock.feature_set.currentText(), dock.classifier.currentText()) == ("multiscale", "extra_trees")
    assert not dock.backbone.isEnabled() and not dock.upsampler.isEnabled()  # a filter bank has neither, as on the command line


def test_the_form_describes_the_computation_as_the_command_line_names_it(widget):
    assert widget.computation() == FeatureComputation("multiscale")
    widget.feature_set.setCurrentText("dinov2")
    widget.preset.setCurrentText("fast")
    assert widget.upsampler.isEnabled() and widget.computation() == FeatureComputation("dinov2", preset="fast")
    widget.upsampler.setCurrentText("anyup")
    assert widget.computation() == FeatureComputation("dinov2", backbone="dinov2_vits14", preset="fast", upsampler="anyup")


def test_the_first_session_opens_the_sample_and_segments_it(widget, qtbot):
    import npe2

    npe2.PluginManager.instance().discover()  # what napari.Viewer does at start (the viewer model does not)
    widget.viewer.open_sample("dinofeat", "three_phase")  # File > Open Sample > dinofeat
    assert (widget.image_layer.currentText(), widget.scribbles_layer.currentText()) == ("sample", "sample scribbles")
    widget.segment()
    finish(qtbot, widget)
    assert set(np.unique(widget.viewer.layers["sample classes"].data)) == {85, 170, 255}


def test_isb_scribbles_give_dinofeat_segments_class_map_and_miou(widget, qtbot, isb, tmp_path, inprocess_address):
    with_scribbles(widget, isb["image"], isb["scribbles"])
    widget.segment()
    finish(qtbot, widget)
    shown = widget.viewer.layers["isb classes"].data
    tifffile.imwrite(tmp_path / "image.tif", isb["image"])
    tifffile.imwrite(tmp_path / "scribbles.tif", isb["scribbles"])
    cli = run_cli("segment", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "scribbles.tif"), "-o",
                  str(tmp_path / "seg.tif"), "--seed", "0", "--server", inprocess_address, "--quiet")
    assert cli.returncode == 0, cli.stderr
    expected = tifffile.imread(tmp_path / "seg.tif")
    np.testing.assert_array_equal(shown, expected)
    assert mean_iou(shown, isb["ground_truth"]) == mean_iou(expected, isb["ground_truth"]) > 0.5
    probabilities = widget.viewer.layers["isb probabilities"].data
    assert probabilities.shape == (3, 512, 512) and np.allclose(probabilities.sum(axis=0), 1, atol=1e-4)


def test_live_mode_predicts_after_a_stroke_and_cancels_the_stale_prediction(widget, qtbot, isb):
    scribbles = with_scribbles(widget, isb["image"], isb["scribbles"].copy())
    widget.live.setChecked(True)
    scribbles.paint((40, 40), 85)  # a finished stroke: napari's paint event
    qtbot.waitUntil(lambda: len(widget.jobs) == 1, timeout=WAIT_MS)
    scribbles.paint((470, 470), 255)  # a second stroke while the first prediction runs
    finish(qtbot, widget, count=2)
    assert [job.outcome for job in widget.jobs] == ["cancelled", "done"]
    assert widget.viewer.layers["isb classes"].data[470, 470] == 255


def test_naparis_progress_bar_cancels_the_running_segmentation(widget, qtbot, isb):
    with_scribbles(widget, isb["image"], isb["scribbles"])
    widget.segment()
    qtbot.waitUntil(lambda: widget.progress_bar is not None and widget.progress_bar.n > 0, timeout=WAIT_MS)
    widget.progress_bar.cancel()  # the Cancel button of napari's activity dock
    finish(qtbot, widget)
    assert [job.outcome for job in widget.jobs] == ["cancelled"] and "isb classes" not in widget.viewer.layers


def test_a_saved_model_of_two_images_applied_by_the_cli_equals_the_widgets_result(widget, qtbot, isb, tmp_path, inprocess_address):
    halves = [(isb["image"][:, :256], isb["scribbles"][:, :256]), (isb["image"][:, 256:], isb["scribbles"][:, 256:])]
    with_scribbles(widget, *halves[1], name="right")
    with_scribbles(widget, *halves[0], name="left")
    widget.all_images.setChecked(True)
    model = tmp_path / "model.dfm"
    widget.save_model(model)
    finish(qtbot, widget)
    widget.apply_model(model, widget.viewer.layers["right"])
    finish(qtbot, widget, count=2)
    tifffile.imwrite(tmp_path / "right.tif", halves[1][0])
    cli = run_cli("apply", str(model), str(tmp_path / "right.tif"), "-o", str(tmp_path / "applied.tif"),
                  "--server", inprocess_address, "--quiet")
    assert cli.returncode == 0, cli.stderr
    np.testing.assert_array_equal(widget.viewer.layers["right classes"].data, tifffile.imread(tmp_path / "applied.tif"))


def test_an_rgb_layer_is_segmented_as_one_colour_image(widget, qtbot, isb):
    crop = isb["image"][:96, :96]
    rgb = np.stack([crop, crop // 2, 255 - crop], axis=-1)
    widget.viewer.add_image(rgb, name="colour", rgb=True)
    widget.image_layer.setCurrentText("colour")
    widget.add_scribbles().data = isb["scribbles"][:96, :96]
    widget.segment()
    finish(qtbot, widget)
    assert widget.viewer.layers["colour classes"].data.shape == (96, 96)
    assert set(np.unique(widget.viewer.layers["colour classes"].data)) <= {85, 170, 255}


def stack_of(isb: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Three 160x160 crops of ISB-3 as a stack, scribbled on its first slice only."""
    image = np.stack([isb["image"][:160, :160], isb["image"][160:320, :160], isb["image"][320:480, :160]])
    scribbles = np.zeros_like(image)
    scribbles[0] = isb["scribbles"][:160, :160]
    return image, scribbles


def test_a_stack_segments_the_current_slice_first_then_every_slice(widget, qtbot, isb):
    image, scribbles = stack_of(isb)
    with_scribbles(widget, image, scribbles, name="stack")
    widget.viewer.dims.set_current_step(0, 2)
    widget.segment()
    finish(qtbot, widget)
    classes = widget.viewer.layers["stack classes"].data
    assert classes[2].all() and not classes[:2].any()  # the slice on screen, and only it
    first = classes[2].copy()
    widget.segment_all_slices()
    finish(qtbot, widget, count=2)
    assert classes.all() and np.array_equal(classes[2], first)


def test_an_ome_zarr_volume_opens_lazily_and_is_segmented_slice_by_slice(widget, qtbot, isb, tmp_path):
    zarr = pytest.importorskip("zarr")
    import npe2
    from ome_zarr.writer import write_image

    image, scribbles = stack_of(isb)
    root = zarr.open_group(str(tmp_path / "volume.zarr"), mode="w")
    write_image(image, root, axes="zyx", scale_factors=[])
    npe2.PluginManager.instance().discover()  # what napari.Viewer does at start (the viewer model does not)
    [layer] = widget.viewer.open(str(tmp_path / "volume.zarr"), plugin="dinofeat")  # the plugin's lazy OME-Zarr reader
    assert layer.multiscale and layer.name == "volume"
    widget.image_layer.setCurrentText("volume")
    widget.add_scribbles().data = scribbles
    widget.viewer.dims.set_current_step(0, 1)
    widget.segment()
    finish(qtbot, widget)
    widget.segment_all_slices()
    finish(qtbot, widget, count=2)
    classes = widget.viewer.layers["volume classes"].data
    assert classes.shape == image.shape and classes.all()
    assert type(widget.viewer.layers["volume"].data[0]).__name__ == "Array"  # still dask: read slice by slice


def only_sentence(widget: DinofeatWidget) -> str:
    """The widget's last sentence, which napari's notifications show too, without a traceback."""
    sentence = widget.status.text()
    assert sentence and sentence in [str(n.message) for n in notification_manager.records]
    assert "Traceback" not in sentence and "\n" not in sentence and sentence.endswith(".")
    return sentence


def test_a_server_that_is_down_gets_one_sentence(widget, qtbot, isb):
    with_scribbles(widget, isb["image"][:96, :96], isb["scribbles"][:96, :96])
    widget.server.setText(f"127.0.0.1:{free_port()}")
    widget.segment()
    finish(qtbot, widget)
    assert widget.jobs[0].outcome == "failed"
    assert "127.0.0.1" in only_sentence(widget)


def test_an_empty_server_field_starts_and_uses_this_users_local_server(widget, qtbot, isb, tmp_path, monkeypatch):
    from dinofeat_client import local_server

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # a runtime folder of its own, so the server is this test's
    monkeypatch.setenv("DINOFEAT_LOCAL_SERVER", "1")
    with_scribbles(widget, isb["image"][:96, :96], isb["scribbles"][:96, :96])
    widget.server.setText("")
    try:
        widget.segment()
        finish(qtbot, widget)
        assert widget.jobs[0].outcome == "done", widget.status.text()
        assert len(local_server.running()) == 1
        assert any("started a local dinofeat server" in str(n.message) for n in notification_manager.records)
    finally:
        for info in local_server.running():
            local_server.stop(info)


def test_without_a_server_address_and_with_the_local_server_turned_off_the_widget_says_what_to_type(widget, qtbot, isb):
    assert os.environ["DINOFEAT_LOCAL_SERVER"] == "0"  # tests/conftest.py: no test leaves a local server running
    with_scribbles(widget, isb["image"][:96, :96], isb["scribbles"][:96, :96])
    widget.server.setText("")
    widget.segment()
    finish(qtbot, widget)
    assert "HOST:PORT" in only_sentence(widget)


def test_a_server_that_refuses_the_token_gets_one_sentence(widget, qtbot, isb, tmp_path):
    (tmp_path / "server_tokens").write_text("alice 0123456789abcdef0123\n")
    (tmp_path / "my_token").write_text("not-alices-token-0000\n")
    server = InProcessServer(token_file=str(tmp_path / "server_tokens"))
    address = server.address
    try:
        with_scribbles(widget, isb["image"][:96, :96], isb["scribbles"][:96, :96])
        widget.server.setText(address)
        widget.token_file.setText(str(tmp_path / "my_token"))
        widget.segment()
        finish(qtbot, widget)
        assert "refused" in only_sentence(widget)
    finally:
        server.stop()


@pytest.mark.parametrize("scribbled, words", [
    ("empty", "are empty"), ("one class", "one class only"), ("another shape", "have shape 32x32 but"),
])
def test_bad_scribbles_get_one_sentence_and_nothing_is_sent_or_lost(widget, isb, scribbled, words):
    scribbles = {"empty": np.zeros((64, 64), np.uint8), "one class": np.where(isb["scribbles"][:64, :64] > 0, 85, 0).astype(np.uint8),
                 "another shape": isb["scribbles"][:32, :32]}[scribbled]
    layer = with_scribbles(widget, isb["image"][:64, :64], np.zeros((64, 64), np.uint8))
    layer.data = scribbles
    widget.segment()
    assert words in only_sentence(widget)
    assert widget.jobs == [] and np.array_equal(layer.data, scribbles)


SCREENSHOT = """
import sys, numpy as np, tifffile, napari
from dinofeat_napari.widget import DinofeatWidget
folder, address = sys.argv[1], sys.argv[2]
viewer = napari.Viewer(show=True)
widget = DinofeatWidget(viewer)
viewer.window.add_dock_widget(widget, name="dinofeat")
widget.server.setText(address)
viewer.add_image(tifffile.imread(folder + "/image.tif"), name="isb")
widget.add_scribbles().data = tifffile.imread(folder + "/scribbles.tif")
worker = widget.segment()
from qtpy.QtCore import QTimer
def shoot():
    viewer.screenshot(folder + "/viewer.png", canvas_only=False)
    viewer.screenshot(folder + "/canvas.png", canvas_only=True)
    napari.Viewer.close_all()
worker.finished.connect(lambda: QTimer.singleShot(300, shoot))
napari.run()
"""


def test_a_screenshot_of_the_viewer_shows_the_class_map(tmp_path, isb, inprocess_address):
    """Rendering needs OpenGL, which Qt's offscreen platform lacks: the viewer runs on a virtual X display (Xvfb)."""
    if shutil.which("xvfb-run") is None:
        pytest.skip("xvfb-run is not installed (Debian: apt-get install xvfb); napari's canvas needs a display to render")
    crop = (slice(0, 256), slice(0, 256))
    tifffile.imwrite(tmp_path / "image.tif", isb["image"][crop])
    tifffile.imwrite(tmp_path / "scribbles.tif", isb["scribbles"][crop])
    env = {key: value for key, value in os.environ.items() if key != "QT_QPA_PLATFORM"}
    run = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", sys.executable, "-c", SCREENSHOT, str(tmp_path),
                          inprocess_address], capture_output=True, text=True, timeout=120, env=env)
    assert (tmp_path / "viewer.png").is_file(), run.stderr[-2000:]
    import imageio.v3 as iio

    picture = iio.imread(tmp_path / "viewer.png")[..., :3].astype(int)
    # the class map's Labels colours over the grey image: many strongly coloured (not grey) pixels
    colourful = (picture.max(axis=-1) - picture.min(axis=-1)) > 60
    assert colourful.mean() > 0.05, f"only {colourful.mean():.1%} of the screenshot is coloured"
