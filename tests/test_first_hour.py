"""A new user's first hour, second walk: a batch's summary reads as one
sentence per image, a file that cannot be written fails only its image, a server that stays away ends
the batch instead of retrying for every image left; pictures of stacks show their middle slice; an
ilastik project refuses new images computed with other weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import dinofeat
from dinofeat_client.batch import run_batch
from dinofeat.contract.errors import DinofeatError, ServerUnavailable
from dinofeat_client.pictures import class_overlay, drawable


def batch_of(names: list[str], failures: dict[str, Exception]):
    """run_batch over files named `names` whose work raises `failures[name]`; the report and the names worked on."""
    tried: list[str] = []

    def work(path: Path) -> None:
        tried.append(path.name)
        if path.name in failures:
            raise failures[path.name]

    report = run_batch([Path(n) for n in names], work, lambda path: False, lambda *seen: None)
    return report, tried


def test_the_summary_ends_each_failure_once_with_a_single_full_stop():
    report, _ = batch_of(["a.tif", "b.tif", "c.tif"], {"a.tif": DinofeatError("cannot read a.tif: truncated."),
                                                      "c.tif": DinofeatError("the model expects 63 channels.")})
    assert report.summary() == "1 done, 2 failed: a.tif: cannot read a.tif: truncated; c.tif: the model expects 63 channels."


def test_an_output_that_cannot_be_written_fails_its_image_and_the_others_go_on(capsys):
    report, tried = batch_of(["a.tif", "b.tif"], {"a.tif": PermissionError(13, "Permission denied", "out/a.tif")})
    assert tried == ["a.tif", "b.tif"] and [p.name for p in report.done] == ["b.tif"]
    assert report.failed == [(Path("a.tif"), "Permission denied (out/a.tif)")]
    assert "a.tif: Permission denied (out/a.tif)" in capsys.readouterr().err


def test_a_server_that_stays_unavailable_ends_the_batch_and_says_what_was_not_tried():
    gone = ServerUnavailable("lost the connection to the dinofeat server at gpu:50051; run the same command again to resume.")
    report, tried = batch_of(["a.tif", "b.tif", "c.tif", "d.tif"], {"b.tif": gone})
    assert tried == ["a.tif", "b.tif"]  # not c and d: each would have waited through every retry
    assert [p.name for p in report.not_tried] == ["c.tif", "d.tif"]
    assert report.summary().endswith("2 not tried (the server is unavailable; run the same command again to do them).")


def test_a_stack_is_drawn_as_its_middle_slice_and_a_plane_as_itself():
    image = np.arange(5 * 8 * 9, dtype=np.uint16).reshape(5, 8, 9)
    class_map = np.stack([np.full((8, 9), z + 1, np.uint8) for z in range(5)])
    plane, classes, z, note = drawable(image, class_map)
    assert z == 2 and note == " (pictures of the middle slice, z = 2 of 0..4)"
    np.testing.assert_array_equal(plane, image[2])
    assert np.unique(classes).tolist() == [3]
    assert class_overlay(plane, classes).shape[1:] == (9, 3)
    rgb = np.zeros((8, 9, 3), np.uint8)
    assert drawable(rgb, class_map[0])[2:] == (None, "")


def test_cluster_pictures_of_a_stack_show_its_middle_slice(tmp_path, server_address):
    rng = np.random.default_rng(0)
    stack = np.clip(rng.normal(100, 20, (3, 48, 48)), 0, 255).astype(np.uint8)
    stack[:, :, 24:] += 80
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    result = dinofeat("cluster", str(tmp_path / "stack.tif"), "-k", "2", "-o", str(tmp_path / "c.tif"), "--pictures",
                      "--server", server_address)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.overlay.png").exists() and "middle slice" in result.stdout


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    from tiny_vit import save_official, tiny_model

    return save_official(tiny_model(seed=1), tmp_path_factory.mktemp("other") / "other_vits14.pth")


def test_an_ilastik_batch_with_other_weights_is_refused_and_writes_nothing(tmp_path, tiny_weights, other_weights):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 255, (56, 70), dtype=np.uint8))
    made = dinofeat("ilastik", str(tmp_path / "a.tif"), "-o", str(tmp_path / "project"), "--set", "dinov2", "--pca", "4",
                    "--preset", "fast", "--weights", str(tiny_weights), "--device", "cpu")
    assert made.returncode == 0, made.stderr
    refused = dinofeat("ilastik", "--batch", str(tmp_path / "project"), str(tmp_path / "b.tif"), "--weights", str(other_weights),
                       "--device", "cpu")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "the feature space was fitted for weights with sha256 " in refused.stderr and "(other weights)" in refused.stderr
    assert not (tmp_path / "project" / "b").exists()


def test_a_stage_first_heard_midway_in_a_log_estimates_from_the_previous_message(capsys):
    import re
    import time

    from dinofeat_client.cli import ProgressBars

    bars = ProgressBars(enabled=True, terminal=False, every_s=0)
    bars("tiles", 0, 1)
    time.sleep(0.5)
    bars("views", 4, 9)
    bars("views", 8, 9)
    lines = capsys.readouterr().err.splitlines()[1:]
    assert lines and all(re.search(r", about [01] s left$", line) for line in lines), lines  # 4, then 8 views in about 0.5 s


def test_a_stage_first_heard_midway_on_a_terminal_estimates_from_the_previous_message():
    import time

    from dinofeat_client.cli import ProgressBars

    bars = ProgressBars(enabled=True, terminal=True)
    bars("tiles", 0, 1)
    time.sleep(0.5)
    bars("views", 4, 9)
    left = bars.seconds_left(time.monotonic())
    bars.close()
    assert left is not None and left < 2, left  # 5 views left at 4 views in about 0.5 s


@pytest.fixture()
def every_cpu_run_is_long(monkeypatch):
    """The server announces every CPU computation's expected time, however short (an in-process server)."""
    from dinofeat_server.engine import deep

    monkeypatch.setattr(deep, "NOTICE_SECONDS", 0.0)


def notices_of(tiny_weights, call) -> list[str]:
    """What the client's `notify` hears while `call(client)` runs against an embedded server with the tiny ViT."""
    from dinofeat_client.client import FeatureClient
    from dinofeat_server.service.server import EmbeddedServer

    heard: list[str] = []
    with EmbeddedServer("cpu", {"dinov2_vits14": str(tiny_weights)}) as address, FeatureClient(address, notify=heard.append) as client:
        call(client)
    return [line for line in heard if "takes about" in line]


def scribbled() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((56, 70), np.uint8)
    image[:, 35:] = 200
    labels = np.zeros((56, 70), np.uint8)
    labels[10:40, 5:10], labels[10:40, 60:65] = 1, 2
    return image, labels


def test_segment_passes_the_servers_time_notice_on(every_cpu_run_is_long, tiny_weights, tmp_path):
    image, labels = scribbled()
    heard = notices_of(tiny_weights, lambda client: client.segment(image, labels, tmp_path / "s.tif", "dinov2", preset="default"))
    assert heard and "with preset 'default'; --preset fast needs about" in heard[0]


def test_train_passes_the_servers_time_notice_on(every_cpu_run_is_long, tiny_weights, tmp_path):
    image, labels = scribbled()
    heard = notices_of(tiny_weights, lambda client: client.train([image], [labels], tmp_path / "m.dfm", "dinov2", preset="default"))
    assert heard and "with preset 'default'; --preset fast needs about" in heard[0]
