"""Progress tells the truth: counts of real work, with a rate and the time left, on a terminal and in logs."""

from __future__ import annotations

import re

import numpy as np
import tifffile
from conftest import dinofeat
from dinofeat_client.cli import ProgressBars
from dinofeat.contract.durations import spoken_duration


def test_outside_a_terminal_each_stage_logs_its_words_done_total_and_time_left(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=0)
    for done in range(5):
        bars("tiles", done, 4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("dinofeat: computing deep features 0/4 (0 %), ")
    assert lines[1].startswith("dinofeat: computing deep features 1/4 (25 %), ") and lines[1].endswith(" left")
    assert re.fullmatch(r"dinofeat: computing deep features 3/4 \(75 %\), \d+ s so far, about \d+ s left", lines[-2])
    assert re.fullmatch(r"dinofeat: computing deep features 4/4 \(100 %\), \d+ s so far", lines[-1])


def test_quick_stages_print_nothing_in_logs(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=10)
    for done in range(4):
        bars("features", done, 3)
    assert capsys.readouterr().err == ""


def test_times_left_read_as_people_say_them():
    assert [spoken_duration(s) for s in (4.4, 125, 7805)] == ["4 s", "2 min 5 s", "2 h 10 min"]


def test_a_command_in_a_log_reports_its_stages(server_address, tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "image.tif", (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8))
    monkeypatch.setenv("DINOFEAT_PROGRESS_SECONDS", "0")
    result = dinofeat("features", str(tmp_path / "image.tif"), "-o", str(tmp_path / "f.h5"), "--set", "classical",
                      "--server", server_address)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^dinofeat: receiving \d+/\d+ \(\d+ %\), ", result.stderr, re.MULTILINE), result.stderr


def test_a_long_cpu_computation_is_announced_with_the_fast_presets_time(monkeypatch):
    import torch
    from dinofeat_server.engine.backbone import DinoVisionTransformer
    from dinofeat_server.engine.deep import PRESETS, DeepExtractor
    from dinofeat_server.engine.progress import Advance
    from dinofeat_server.engine.weights import official_config

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    extractor = DeepExtractor(DinoVisionTransformer(official_config("dinov2_vits14")), torch.device("cpu"))
    first = next(extractor.blocks(np.zeros((518, 518), np.float32), PRESETS["default"]))  # planned, nothing computed yet
    assert isinstance(first, Advance) and (first.stage, first.done) == ("tiles", 0)
    # ViT-S at 518x518 on 2 threads: 138 s measured for `default`, 1.8 s for the `fast` forward (README)
    assert re.fullmatch(r"this 518x518 image takes about 2 min \d+ s on this server's CPU with preset 'default'; "
                        r"--preset fast needs about \d+x fewer operations \(a GPU server takes seconds\)\.", first.notice), first.notice


def test_a_short_cpu_computation_is_not_announced():
    import torch
    from dinofeat_server.engine.backbone import DinoVisionTransformer
    from dinofeat_server.engine.deep import PRESETS, DeepExtractor
    from dinofeat_server.engine.weights import official_config

    extractor = DeepExtractor(DinoVisionTransformer(official_config("dinov2_vits14")), torch.device("cpu"))
    assert next(extractor.blocks(np.zeros((224, 224), np.float32), PRESETS["fast"])).notice == ""


def test_the_servers_notice_travels_in_the_progress_message():
    from dinofeat_server.engine.progress import Advance
    from dinofeat_server.service.streaming import progress_of

    message = progress_of(Advance("tiles", 0, 4, "this takes a while."), "slice 1/2: ")
    assert (message.stage, message.done, message.total, message.notice) == ("slice 1/2: tiles", 0, 4, "this takes a while.")
