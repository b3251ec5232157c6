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


def key_seen_by(package_parent: Path) -> str:
    """The local server key (device cpu, default weights) that the dinofeat_client under `package_parent` computes."""
    code = "from dinofeat_client.local_server import server_key; print(server_key('cpu', None))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(package_parent)},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_two_checkouts_of_one_version_have_two_local_server_keys(tmp_path):
    import shutil

    from dinofeat_client import local_server

    shutil.copytree(ROOT / "clients" / "dinofeat_client", tmp_path / "dinofeat_client")
    assert key_seen_by(ROOT / "clients") == local_server.server_key("cpu", None)
    assert key_seen_by(tmp_path) != local_server.server_key("cpu", None)


def test_local_status_names_the_installation_a_server_belongs_to(tmp_path, monkeypatch):
    from conftest import run_cli
    from dinofeat_client import local_server

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
