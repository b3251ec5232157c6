"""Start-up: what a command loads before it works. `dinofeat sets` loads no torch and starts no server;
`dinofeat segment` does not load what it never uses; the client's set list is the server's."""

from __future__ import annotations

import ast
import subprocess
import sys

from dinofeat.contract.feature_sets import SETS
from dinofeat_server.engine.stacks import FEATURE_SETS

HEAVY = ("torch", "sklearn", "skops", "dinofeat_server", "h5py")


def loaded_after(command: list[str]) -> tuple[str, list[str]]:
    """Run `dinofeat COMMAND` in a fresh interpreter; its output and which of HEAVY it had loaded by the end."""
    code = ("import sys; from dinofeat_client.cli import main; status = main(sys.argv[1:]); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    *lines, modules = result.stdout.strip().splitlines()
    return "\n".join(lines), ast.literal_eval(modules)


def test_listing_sets_without_a_server_loads_no_torch_and_starts_no_server():
    output, loaded = loaded_after(["sets"])
    assert [line.split()[0] for line in output.split("\n\n")[0].splitlines()] == [s.name for s in SETS]  # then the backbones
    assert "torch" not in loaded and "dinofeat_server" not in loaded and "sklearn" not in loaded
    classical = next(line for line in output.splitlines() if line.startswith("classical "))
    assert classical.split()[1:3] == ["58", "channels"]
    assert classical.endswith(FEATURE_SETS["classical"].description)


def test_the_clients_set_list_is_the_servers_registry():
    """One line here and one in engine/stacks.py per set: the names, order, kinds, channel counts and
    descriptions must agree (this fails when a set is added to only one of them)."""
    assert [s.name for s in SETS] == list(FEATURE_SETS), \
        "each set of engine/stacks.py FEATURE_SETS needs its line in clients/dinofeat_client/feature_sets.py SETS, in the same order"
    for listed in SETS:
        served = FEATURE_SETS[listed.name]
        assert (listed.description, listed.deep, listed.channels) == (
            served.description, served.deep, len(served.channel_names(1))), listed.name


def test_segmenting_with_an_embedded_server_loads_no_model_file_format(isb_three_phase, tmp_path):
    """skops (model files) scans scikit-learn when imported, about a second: segment never writes a model."""
    output, loaded = loaded_after(["segment", str(isb_three_phase / "image.tif"), "--labels", str(isb_three_phase / "scribbles.tif"),
                                   "-o", str(tmp_path / "seg.tif"), "--trees", "10", "--quiet"])
    assert output == f"wrote {tmp_path / 'seg.tif'}"
    assert "skops" not in loaded
    assert {"torch", "sklearn", "dinofeat_server"} <= set(loaded)


def test_the_server_has_openmp_threads_sleep_rather_than_spin_unless_told_otherwise():
    """libgomp's threads spin after each parallel region by default; on a busy machine they take the cores
    the work needs (the default bank: 2-5 s at 2 threads instead of 0.2 s). The server sets the passive
    policy before torch loads libgomp, and keeps a value the user set."""
    import os

    code = "import os, dinofeat_server, torch; print(os.environ['OMP_WAIT_POLICY'])"
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = environment if given is None else {**environment, "OMP_WAIT_POLICY": given}
        result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
