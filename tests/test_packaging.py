"""The contract and the dependency rule: committed stubs are current; the thin client needs no torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    """protos/generate.py, loaded by path: protos/ must not go on sys.path (its dinofeat/ folder would
    shadow the stubs' package)."""
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


def test_regenerating_the_protobuf_stubs_gives_the_committed_files(tmp_path):
    for fresh in load_generator()(tmp_path):
        committed = ROOT / "clients" / fresh.relative_to(tmp_path)
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run python protos/generate.py"


def test_client_modules_import_neither_torch_nor_the_server():
    code = ("import sys, dinofeat_client.cli, dinofeat_client.client, dinofeat_client.dataset_file, "
            "dinofeat_client.pictures, dinofeat_client.sample, dinofeat_client.metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dinofeat_server', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_talking_to_a_remote_server_loads_no_torch(server_address):
    code = ("import sys; from dinofeat_client.cli import main; main(['sets', '--server', sys.argv[1]]); "
            "print('torch loaded' if 'torch' in sys.modules else 'thin')")
    out = subprocess.run([sys.executable, "-c", code, server_address], capture_output=True, text=True, check=True).stdout
    assert "classical" in out and out.strip().endswith("thin")


def test_no_client_source_file_imports_torch():
    for path in (ROOT / "clients").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
