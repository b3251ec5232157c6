"""`./dev`'s usage text and `./dev bench`: names, quick/full/save, going on after a failure, where results go.

`dev` runs for real through bash. Most tests give it a stand-in virtual environment whose `python`
only echoes its arguments (instant, and it shows exactly what `dev` would run); one test runs a tiny
real benchmark through the project's own environment, linked under a fresh install stamp so that `dev`
never reinstalls in the middle of the tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "bench").glob("bench_*.py"))
NAMES = [Path(path).stem.removeprefix("bench_") for path in BENCHES]
STAMP = ".installed-" + re.search(r"^  setup (\S+)$", (ROOT / "dev").read_text(), re.M).group(1)
"""The install stamp ./dev bench looks for: with it, the linked environment is taken as set up (never reinstalled)."""


def dev(*args: str, venv: Path | None = None, cwd: Path = ROOT, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """Run `bash dev ARGS` (from `cwd`) with DINOFEAT_VENV=`venv` and the extra environment `env`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DINOFEAT_")}
    environment.update(env, DINOFEAT_VENV=str(venv or cwd / "no-venv-here"))
    return subprocess.run(["bash", str(ROOT / "dev"), *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def echo_venv(tmp_path: Path) -> Path:
    """A stand-in venv that `dev` finds installed: its python prints `ARGS | results=$DINOFEAT_BENCH_RESULTS`
    and fails (status 3) for bench/bench_deep.py, to show that a full run goes on after a failure."""
    venv = tmp_path / "echo-venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\necho "$* | results=${DINOFEAT_BENCH_RESULTS:-}"\n[ "$1" != bench/bench_deep.py ] || exit 3\n')
    python.chmod(0o755)
    (venv / STAMP).touch()
    return venv


@pytest.fixture
def project_venv(tmp_path: Path) -> Path:
    """The environment running these tests, linked entry by entry under a fresh install stamp."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtual environment, so there is none to hand to ./dev")
    venv = tmp_path / "venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if not entry.name.startswith(".installed-"):
            (venv / entry.name).symlink_to(entry)
    (venv / STAMP).touch()
    return venv


def usage_lines() -> list[str]:
    """The comment block at the top of dev, without its '# ': what the usage should print."""
    lines = []
    for line in (ROOT / "dev").read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def test_usage_prints_the_comment_block_and_nothing_else():
    helped, bare, unknown = dev("help"), dev(), dev("frobnicate")
    assert helped.returncode == 0 and helped.stdout.splitlines() == usage_lines()
    assert any("./dev bench [--full] [--save]" in line for line in usage_lines())
    assert bare.returncode == 2 and bare.stderr.splitlines() == usage_lines()
    assert unknown.returncode == 2
    first, *rest = unknown.stderr.splitlines()
    assert first == "dev: unknown command 'frobnicate'; the commands are demo, test, bench and help."
    assert rest == usage_lines()
    for output in (helped.stdout, bare.stderr, unknown.stderr):
        assert "set -e" not in output and "#" not in output.replace("#!", "")


def test_unknown_benchmark_gets_one_sentence_before_any_install(tmp_path: Path):
    venv = tmp_path / "untouched-venv"
    done = dev("bench", "clasical", venv=venv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"dev: there is no benchmark called 'clasical'; the benchmarks are: {', '.join(NAMES)}.\n"
    assert not venv.exists()  # the name was checked before setting anything up
    assert "machine" not in NAMES and dev("bench", "machine", venv=venv).returncode == 2


@pytest.mark.parametrize("name", ["classical", "bench_classical", "bench/bench_classical.py", "./bench/bench_classical.py"])
def test_short_and_long_names_run_the_same_script_in_quick_mode(echo_venv: Path, name: str):
    done = dev("bench", name, "--repeats", "1", venv=echo_venv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" | ")[0] == "bench/bench_classical.py --quick --repeats 1"


def test_full_and_save_reach_the_script_and_save_needs_full(echo_venv: Path):
    assert dev("bench", "--full", "stream", venv=echo_venv).stdout.startswith("bench/bench_stream.py --full |")
    assert dev("bench", "--full", "--save", "stream", venv=echo_venv).stdout.startswith("bench/bench_stream.py --full --save |")
    refused = dev("bench", "--save", "stream", venv=echo_venv)
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert "--full --save" in refused.stderr
    odd = dev("bench", "--fast", venv=echo_venv)
    assert odd.returncode == 2 and len(odd.stderr.splitlines()) == 1


SLOW = ["bank_choice", "lab_server", "napari", "peers", "pixel_classification", "reference"]


def test_a_run_of_all_goes_on_after_a_failure_and_lists_it(echo_venv: Path):
    done = dev("bench", "--full", venv=echo_venv)
    assert done.returncode == 1
    assert [line.split(" | ")[0] for line in done.stdout.splitlines()] == [f"{path} --full" for path in BENCHES]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"dev: {len(BENCHES)} benchmarks in ") and last.endswith("these failed: bench/bench_deep.py.")


def test_all_at_quick_sizes_leave_out_the_slow_comparisons_and_name_them(echo_venv: Path):
    done = dev("bench", venv=echo_venv)
    quick = [path for path in BENCHES if Path(path).stem.removeprefix("bench_") not in SLOW]
    assert [line.split(" | ")[0] for line in done.stdout.splitlines()] == [f"{path} --quick" for path in quick]
    assert done.stderr.splitlines()[-2] == (f"dev: left out at quick sizes (minutes each): {', '.join(SLOW)}; "
                                            "run one with ./dev bench NAME, or all with --full.")


def test_a_relative_results_folder_is_taken_from_the_callers_folder(echo_venv: Path, tmp_path: Path):
    done = dev("bench", "stream", venv=echo_venv, cwd=tmp_path, DINOFEAT_BENCH_RESULTS="mine")
    assert done.stdout.strip().endswith(f"| results={tmp_path / 'mine'}")


def test_a_real_quick_run_writes_outside_the_published_figures(project_venv: Path, tmp_path: Path):
    published = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (ROOT / "bench" / "results").glob("*.json")}
    done = dev("bench", "classical", "--sizes", "64", "--repeats", "1", venv=project_venv, timeout=120,
               DINOFEAT_BENCH_RESULTS=str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert f"saved {tmp_path / 'out' / 'classical.json'}" in done.stdout
    saved = json.loads((tmp_path / "out" / "classical.json").read_text())
    assert saved["mode"] == "quick" and list(saved["results"]) == ["64x64"] and "cpu" in saved["machine"]
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in published} == published


def machine_module():
    """bench/machine.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("bench_machine_under_test", ROOT / "bench" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed(machine, *argv: str):
    """parse_args of a parser like the benchmarks' (--sizes, --repeats) on `argv`."""
    import argparse

    parser = argparse.ArgumentParser(prog="bench_x")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    sys.argv = ["bench_x", *argv]
    return machine.parse_args(parser, quick={"sizes": [512], "repeats": 1})


def test_quick_defaults_yield_to_explicit_options_and_the_last_mode_wins(monkeypatch, capsys):
    machine = machine_module()
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    assert vars(parsed(machine)) == {"sizes": [512, 2048], "repeats": 3, "mode": "full", "save": False}
    assert not machine.quick()
    assert (parsed(machine, "--quick").sizes, parsed(machine, "--quick", "--repeats", "5").repeats) == ([512], 5)
    assert machine.quick()
    assert parsed(machine, "--quick", "--full").sizes == [512, 2048] and not machine.quick()
    with pytest.raises(SystemExit) as refused:
        parsed(machine, "--quick", "--save")
    assert refused.value.code == 2 and "add --full" in capsys.readouterr().err


def test_save_writes_locally_unless_asked_and_skip_is_one_line(monkeypatch, tmp_path: Path, capsys):
    machine = machine_module()
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    monkeypatch.delenv("DINOFEAT_BENCH_RESULTS", raising=False)
    parsed(machine, "--quick")
    assert machine.results_folder() == machine.LOCAL
    monkeypatch.setenv("DINOFEAT_BENCH_RESULTS", str(tmp_path))
    assert machine.results_folder() == tmp_path
    parsed(machine, "--full", "--save")
    assert machine.results_folder() == machine.RESULTS == ROOT / "bench" / "results"
    assert "bench/results/local/" in (ROOT / ".gitignore").read_text().splitlines()
    with pytest.raises(SystemExit) as skipped:
        machine.skip("bench_x", "no JVM here.")
    assert skipped.value.code == 0 and capsys.readouterr().out == "bench_x: skipped: no JVM here.\n"
