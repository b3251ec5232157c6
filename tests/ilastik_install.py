"""Real headless ilastik for tests: found installed, or installed by ../shared/tools/ilastik/install.sh into
~/.cache/dinofeat-ilastik (about 2.5-4 minutes the first time, seconds after); the test is skipped when it cannot be."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "ilastik" / "install.sh"


def ilastik_launcher() -> Path:
    """ilastik's headless launcher run_ilastik.sh, installed (or found installed) by the vendored install script."""
    if not INSTALL.is_file():
        pytest.skip(f"{INSTALL} is absent, so real ilastik cannot be installed here")
    installed = subprocess.run(["bash", str(INSTALL)], check=False, capture_output=True, text=True, timeout=1800)
    if installed.returncode != 0:
        why = (installed.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"the vendored ilastik could not be installed here: {why}")
    return Path(installed.stdout.strip().splitlines()[-1])


def ilastik_python(launcher: Path) -> Path:
    """The python of the venv that `launcher` runs ilastik in (install.sh puts it beside the launcher)."""
    return launcher.parent / "venv" / "bin" / "python"
