"""Progress tells the truth: counts of real work, with a rate and the time left, on a terminal and in logs."""

from __future__ import annotations

import re

import numpy as np
import tifffile
from conftest import dinofeat
from dinofeat_client.cli import ProgressBars, format_seconds


def test_outside_a_terminal_each_stage_logs_done_total_rate_and_time_left(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=0)
    for done in range(5):
        bars("tiles", done, 4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("dinofeat: tiles 1/4 (25 %), ") and lines[0].endswith(" left")
    assert re.fullmatch(r"dinofeat: tiles 4/4 \(100 %\), [0-9.e+]+/s", lines[-1])


def test_quick_stages_print_nothing_in_logs(capsys):
    bars = ProgressBars(enabled=True, terminal=False, every_s=10)
    for done in range(4):
        bars("features", done, 3)
    assert capsys.readouterr().err == ""


def test_times_left_read_as_people_say_them():
    assert [format_seconds(s) for s in (4.4, 125, 7805)] == ["4 s", "2 min 5 s", "2 h 10 min"]


def test_a_command_in_a_log_reports_its_stages(server_address, tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "image.tif", (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8))
    monkeypatch.setenv("DINOFEAT_PROGRESS_SECONDS", "0")
    result = dinofeat("features", str(tmp_path / "image.tif"), "-o", str(tmp_path / "f.h5"), "--set", "classical",
                      "--server", server_address)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^dinofeat: receiving \d+/\d+ \(\d+ %\), ", result.stderr, re.MULTILINE), result.stderr
