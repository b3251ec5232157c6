"""A new user's second hour (issue 31): `dinofeat` in a fresh shell after ./dev demo, deep sets offline with a random
checkpoint, one server per installation, --overwrite leaving nothing stale, OME-Zarr as current readers want it, and
progress that reads at a glance."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import ROOT, run_cli
from dinofeat_client import local_server
from dinofeat_client.cli.progress import ProgressBars, tell
from dinofeat.contract.computation import FeatureComputation
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.engine.backbone import DinoVisionTransformer
from dinofeat_server.engine.deep import DeepExtractor
from dinofeat_server.engine.progress import run_to_end
from dinofeat_server.engine.stacks import feature_set
from dinofeat_server.engine.weights import load_backbone, official_config, random_backbone, resolve_weights
from dinofeat_server.service import blocks
from dinofeat_server.volumes.classify import classify_to_zarr
from dinofeat_server.volumes.dask_run import dask_client
from ome_zarr.format import FormatV04
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from test_batch_apply import model, phases  # noqa: F401  (model: a fixture, a classical model of two-phase images)

with warnings.catch_warnings():  # ome_zarr.writer's import warns of its own deprecated Scaler, which these tests do not use
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import write_image


def fresh_shell_environment() -> dict[str, str]:
    """The environment of a new shell: no virtual environment active, nothing of .venv on PATH."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != Path(venv_bin).resolve())
    return {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}, "PATH": path or "/usr/bin:/bin"}


def test_the_line_dev_demo_prints_last_puts_dinofeat_on_path_in_a_fresh_shell(tmp_path):
    env = fresh_shell_environment()
    assert subprocess.run(["bash", "-c", "command -v dinofeat"], env=env, capture_output=True).returncode != 0
    demo = subprocess.run([str(ROOT / "dev"), "demo", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    line = demo.stdout.strip().splitlines()[-1]
    assert line.startswith("source ") and line.split()[1].endswith("/bin/activate")
    shell = subprocess.run(["bash", "-c", f"{line}\ndinofeat --version"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.startswith("dinofeat ")


def key_seen_by(package_parent: Path) -> str:
    """The local server key (device cpu, default weights) that the dinofeat_client under `package_parent` computes."""
    code = "from dinofeat_client.local_server import server_key; print(server_key('cpu', None))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(package_parent)},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_two_checkouts_of_one_version_have_two_local_server_keys(tmp_path):
    shutil.copytree(ROOT / "clients", tmp_path / "clients")
    assert key_seen_by(ROOT / "clients") == local_server.server_key("cpu", None)
    assert key_seen_by(tmp_path / "clients") != local_server.server_key("cpu", None)


def test_local_status_names_the_installation_a_server_belongs_to(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    address = local_server.local_address("cpu", None, notify=lambda line: None)
    try:
        assert address is not None
        status = run_cli("local", "status")
        assert status.returncode == 0
        assert f"from {sys.prefix} (code in {ROOT / 'clients'})" in status.stdout
    finally:
        for info in local_server.running(tmp_path / "dinofeat"):
            local_server.stop(info)


def test_apply_overwrite_removes_the_probabilities_and_pictures_of_an_earlier_run(model, tmp_path, inprocess_address):
    tifffile.imwrite(tmp_path / "cell.tif", phases(1))
    tifffile.imwrite(tmp_path / "other.tif", phases(2))
    out = tmp_path / "out"
    first = run_cli("apply", str(model), str(tmp_path / "cell.tif"), str(tmp_path / "other.tif"), "-o", str(out),
                    "--probabilities", "--pictures", "--server", inprocess_address)
    assert first.returncode == 0, first.stderr
    assert {"cell.probabilities.h5", "cell.overlay.png", "cell.p1.png", "cell.p2.png"} < {p.name for p in out.iterdir()}
    again = run_cli("apply", str(model), str(tmp_path / "cell.tif"), "-o", str(out), "--overwrite",
                    "--server", inprocess_address)
    assert again.returncode == 0, again.stderr
    left = sorted(p.name for p in out.iterdir())
    assert [name for name in left if name.startswith("cell")] == ["cell.tif"]
    assert "other.probabilities.h5" in left and "other.p2.png" in left  # another image's outputs stay


def test_apply_without_overwrite_skips_the_image_and_keeps_its_earlier_files(model, tmp_path, inprocess_address):
    tifffile.imwrite(tmp_path / "cell.tif", phases(1))
    out = tmp_path / "out"
    assert run_cli("apply", str(model), str(tmp_path / "cell.tif"), "-o", str(out), "--probabilities",
                   "--server", inprocess_address).returncode == 0
    again = run_cli("apply", str(model), str(tmp_path / "cell.tif"), "-o", str(out), "--server", inprocess_address)
    assert "1 skipped" in again.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cell.probabilities.h5", "cell.tif"]


@pytest.fixture(scope="module")
def random_vits14(tmp_path_factory) -> tuple[Path, "subprocess.CompletedProcess"]:
    """`dinofeat weights random dinov2_vits14 -o random.pth --seed 3`: the file and the command's result."""

    path = tmp_path_factory.mktemp("weights") / "random.pth"
    return path, run_cli("weights", "random", "dinov2_vits14", "-o", str(path), "--seed", "3")


def test_a_random_checkpoint_has_the_official_architecture_and_layout(random_vits14):
    path, written = random_vits14
    assert written.returncode == 0, written.stderr
    assert load_backbone(path).config == official_config("dinov2_vits14")
    assert "22.1 M random parameters" in written.stdout


def test_a_random_checkpoint_says_loudly_that_its_features_mean_nothing(random_vits14):
    path, written = random_vits14
    assert f"WARNING: {path} holds RANDOM weights (seed 3)" in written.stderr
    assert "carry NO meaning" in written.stderr and "never for results" in written.stderr


def test_one_seed_gives_one_checkpoint_and_another_seed_another():
    first, again, other = (random_backbone("dinov2_vits14_reg", seed).state_dict() for seed in (5, 5, 6))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert first["register_tokens"].shape == (1, 4, 384)


def test_a_deep_set_runs_offline_with_the_random_checkpoint(random_vits14, tmp_path):
    path, _ = random_vits14
    tifffile.imwrite(tmp_path / "cell.tif", phases(4))
    done = run_cli("features", str(tmp_path / "cell.tif"), "-o", str(tmp_path / "deep.h5"), "--set", "dinov2", "--preset", "fast",
                   "--weights", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "deep.h5") as f:
        assert f["features"].shape[-2:] == (64, 64) and f["features"].shape[0] == 384


def test_a_failed_download_names_the_random_checkpoint_and_the_filter_bank(tmp_path, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("DINOFEAT_CACHE", str(tmp_path))
    monkeypatch.setenv("DINOFEAT_WEIGHTS_URL", f"http://127.0.0.1:{port}/")
    monkeypatch.delenv("DINOFEAT_WEIGHTS", raising=False)
    with pytest.raises(DinofeatError) as refused:
        resolve_weights("dinov2_vits14")
    assert "`dinofeat weights random BACKBONE -o FILE.pth`" in str(refused.value) and "(--set multiscale)" in str(refused.value)


@pytest.mark.parametrize("command", ["fewshot", "ilastik"])
def test_the_help_of_a_command_whose_default_needs_weights_says_so_and_names_the_alternatives(command):
    shown = " ".join(run_cli(command, "--help").stdout.split())
    assert "it needs DINOv2 weights" in shown and "dinofeat weights random BACKBONE -o FILE.pth" in shown
    assert "--set multiscale needs none" in shown


def test_a_label_image_of_an_ome_zarr_volume_names_its_parent_and_reads_without_warnings(model, tmp_path, caplog):
    volume = np.stack([phases(5), phases(6)])
    write_image(volume, zarr.open_group(str(tmp_path / "cells.zarr"), mode="w", zarr_format=2), axes="zyx", fmt=FormatV04(),
                scale_factors=[])
    labels = classify_to_zarr(tmp_path / "cells.zarr", model, tmp_path / "out" / "cells_labels.zarr", device="cpu")[0]
    source = zarr.open_group(str(labels), mode="r").attrs["image-label"]["source"]
    assert source == {"image": "../../cells.zarr"}
    caplog.set_level(logging.DEBUG, logger="ome_zarr")
    nodes = list(Reader(parse_url(str(labels), fmt=FormatV04()))())
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert [Path(node.zarr.path).resolve() for node in nodes] == [(tmp_path / "cells.zarr").resolve(), labels.resolve()]
    assert nodes[1].first(Label) is not None and not nodes[0].visible  # the image, shown under its labels


def test_an_unreachable_dask_scheduler_is_reported_with_the_time_really_waited():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{closed.getsockname()[1]}"
    began = time.monotonic()
    with pytest.raises(DinofeatError) as refused, dask_client(address, connect_seconds=1):
        pass
    waited = time.monotonic() - began
    said = int(str(refused.value).split(" within ")[1].split(" s ")[0])
    assert abs(said - waited) < 1


def progress_lines(err: str) -> list[str]:
    """The lines a progress display showed: each carriage-return rewrite or newline-ended line, escape codes removed."""

    return [part for part in re.split(r"[\r\n]", err.replace("\x1b[K", "")) if part]


def test_on_a_terminal_a_command_shows_one_line_rewritten_in_place(capsys):
    bars = ProgressBars(enabled=True, terminal=True)
    for done in range(1, 11):
        bars("rows", done * 400, 4096)
        bars("receiving", done, 20)
        bars("probabilities", done, 20)
    bars.close()
    err = capsys.readouterr().err
    assert "\n" not in err and err.endswith("\r\x1b[K")  # one line, taken away at the end
    shown = progress_lines(err)
    assert all(line.startswith("dinofeat: computing features ") for line in shown)
    assert shown[-1].startswith("dinofeat: computing features 4000/4096 (97 %), ") and shown[-1].count(" left") == 1


def test_a_stage_that_counts_again_is_shown_as_a_new_pass_never_as_its_share_going_back(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=0)
    for done in (1024, 2048, 4096, 768, 2048):
        bars("rows", done, 4096)
        bars("receiving", 1, 20)  # keeps the command running between the passes
    shares: dict[str, list[int]] = {}
    for line in capsys.readouterr().err.splitlines():
        words, share = re.match(r"dinofeat: (.*?) \d+/\d+ \((\d+) %\)", line).groups()
        shares.setdefault(words, []).append(int(share))
    assert list(shares) == ["computing features", "receiving", "computing features again"]
    assert all(seen == sorted(seen) for seen in shares.values())  # no share ever goes back
    assert shares["computing features again"][0] == 18


def test_the_one_estimate_counts_the_slices_still_to_come():
    bars = ProgressBars(enabled=True, terminal=False, every_s=3600)
    bars.record("slice 1/4: tiles", 0, 10, now=100.0)
    bars.record("slice 1/4: tiles", 5, 10, now=110.0)  # 10 s for half a slice: 10 s more, then 3 slices of 20 s
    bars.record("receiving", 1, 100, now=110.0)
    assert bars.seconds_left(110.0) == pytest.approx(70.0)
    assert bars.current().name == "slice 1/4: tiles"
    passes = ProgressBars(enabled=True, terminal=False, every_s=3600)
    passes.record("pass 1/2: rows", 0, 2048, now=0.0)
    passes.record("pass 1/2: rows", 1024, 2048, now=5.0)  # the features are computed again after training
    assert passes.seconds_left(5.0) == pytest.approx(15.0)
    assert passes.line(5.0).startswith("dinofeat: computing features (pass 1/2) 1024/2048 (50 %), ")


def test_in_a_log_a_long_stage_without_reports_still_prints_a_line_every_few_seconds(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=0.2)
    bars("tiles", 0, 1)  # one deep tile: no report until it is done
    time.sleep(0.75)
    bars.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("dinofeat: computing deep features, ") for line in lines)
    assert "\r" not in "".join(lines)


def test_under_a_pseudo_terminal_deep_work_shows_its_progress_line(inprocess_deep_address, tmp_path):
    tifffile.imwrite(tmp_path / "cell.tif", phases(7))
    main, child = pty.openpty()
    command = [sys.executable, "-m", "dinofeat_client.cli", "features", str(tmp_path / "cell.tif"), "-o", str(tmp_path / "f.h5"),
               "--set", "dinov2", "--preset", "fast", "--server", inprocess_deep_address]
    process = subprocess.Popen(command, stdin=child, stdout=child, stderr=child)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(timeout=60) == 0, seen.decode(errors="replace")
    shown = progress_lines(seen.decode(errors="replace"))
    assert any(line.startswith("dinofeat: fitting the feature space") or line.startswith("dinofeat: computing deep features")
               for line in shown), shown


def test_the_time_estimate_comes_before_the_fit_and_covers_the_fit_and_the_image(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    extractor = DeepExtractor(DinoVisionTransformer(official_config("dinov2_vits14")), torch.device("cpu"))
    options = FeatureComputation("dinov2", preset="default")
    fit = feature_set("dinov2").sample([np.zeros((1024, 1024), np.float32)], None, extractor, torch.device("cpu"), options,
                                       lambda: None)
    first = next(fit)  # planned, nothing computed yet
    assert (first.stage, first.done) == ("fitting the feature space", 0)
    assert re.fullmatch(r"fitting the feature space \(1 crop\) and then this 1024x1024 image takes about \d+ min \d+ s on this "
                        r"server's CPU with preset 'default'; --preset fast needs about \d+x fewer operations \(a GPU server "
                        r"takes seconds\)\.", first.notice), first.notice


def test_a_line_printed_during_a_batch_never_shares_the_terminal_line_with_the_progress(monkeypatch):
    terminal = io.StringIO()  # stdout and stderr on one terminal, as a person sees them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    bars = ProgressBars(enabled=True, terminal=True)
    bars("images", 1, 3)
    bars("rows", 10, 64)
    tell("wrote out/cell.tif")
    bars("rows", 20, 64)
    bars.close()
    shown = terminal.getvalue()
    assert "image 2 of 3, computing features 10/64" in shown
    assert "\x1b[K\r\x1b[Kwrote out/cell.tif\n\rdinofeat: image 2 of 3, computing features 20/64" in shown


def test_a_volume_applied_again_without_probabilities_loses_the_earlier_probabilities_store(model, tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([phases(8), phases(9)]), photometric="minisblack")
    output = tmp_path / "seg.zarr"
    first = classify_to_zarr(tmp_path / "stack.tif", model, output, probabilities=True, device="cpu")
    assert first[1] == tmp_path / "seg.probabilities.zarr" and first[1].is_dir()
    again = classify_to_zarr(tmp_path / "stack.tif", model, output, device="cpu")
    assert again == (output, None) and sorted(p.name for p in tmp_path.iterdir()) == ["seg.zarr", "stack.tif"]


def test_features_computed_again_for_a_second_pass_report_each_pass_as_its_own_stage(monkeypatch):
    monkeypatch.setattr(blocks, "KEEP_BYTES", 0)  # as for an image whose features exceed 256 MiB: computed twice
    image = phases(3)
    features = blocks.WorkerFeatures(feature_set("classical"), FeatureComputation("classical"), None, torch.device("cpu"),
                                     lambda: None)
    space = run_to_end(features.space([image]))
    passes = blocks.BlockPasses(features, image, space, planned=2)
    stages = [[item.stage for item in passes() if not isinstance(item, tuple)] for _ in range(2)]
    assert stages == [["pass 1/2: rows"], ["pass 2/2: rows"]]
