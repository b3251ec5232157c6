"""The contract and the dependency rule: committed stubs are current; the thin client needs no torch."""

from __future__ import annotations

import ast
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


def imported_packages(source: str, package: str) -> set[str]:
    """The top-level packages a source file of `package` imports anywhere in it (functions and branches included),
    relative imports counted as `package`, and the names `importlib.import_module` is called with as text."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def importers_of(package: str, folder: Path) -> list[str]:
    """The source files under `folder` that import `package`, relative to the repository."""
    return sorted(str(path.relative_to(ROOT)) for path in folder.rglob("*.py")
                  if package in imported_packages(path.read_text(), path.relative_to(ROOT).parts[1]))


def test_the_server_never_imports_the_client():
    assert importers_of("dinofeat_client", ROOT / "server") == []


def test_the_client_imports_the_server_in_one_module_only():
    assert importers_of("dinofeat_server", ROOT / "clients") == ["clients/dinofeat_client/server_part.py"]


def test_the_shared_contract_imports_neither_side():
    shared = ROOT / "clients" / "dinofeat"
    assert importers_of("dinofeat_client", shared) == [] and importers_of("dinofeat_server", shared) == []


def test_the_import_rule_check_sees_lazy_relative_and_named_imports():
    lazy = "def later():\n    from dinofeat_client.cli import main\n    return main\n"
    assert imported_packages(lazy, "dinofeat_server") == {"dinofeat_client"}
    assert imported_packages("from ..errors import DinofeatError\n", "dinofeat_client") == {"dinofeat_client"}
    named = "import importlib\nimportlib.import_module('dinofeat_server.engine')\n"
    assert imported_packages(named, "dinofeat_client") == {"importlib", "dinofeat_server"}
