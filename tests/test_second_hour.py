"""A new user's second hour (issue 31): `dinofeat` in a fresh shell after ./dev demo, deep sets offline with a random
checkpoint, one server per installation, --overwrite leaving nothing stale, OME-Zarr as current readers want it, and
progress that reads at a glance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


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
