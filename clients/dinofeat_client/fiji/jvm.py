"""Start the Java side: a local Fiji through pyimagej (headless, offline), or plain ImageJ1 + JHDF5 jars.

One JVM per process (JPype cannot restart one), so the first call decides which it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DinofeatError

DEBIAN_JARS = ("/usr/share/java/ij.jar", "/usr/share/java/sis-jhdf5.jar")
"""ImageJ1 and JHDF5 as Debian installs them (libij-java, libsis-jhdf5-java)."""


FIJI_EXTRA_HINT = ("the Fiji bridge needs pyimagej: install the fiji extra, with pip install 'dinofeat[fiji]' for a "
                   "released dinofeat, or pip install -e '.[fiji]' in a dinofeat checkout (inside its .venv).")


def start_fiji(fiji_dir: str | Path):
    """pyimagej's gateway to a local Fiji.app, headless and without network (no Maven lookups)."""
    fiji_dir = Path(fiji_dir)
    if not (fiji_dir / "jars").is_dir():
        raise DinofeatError(f"{fiji_dir} is not a Fiji installation (it has no jars/ folder); give the Fiji.app folder with --fiji or FIJI_DIR.")
    try:
        import imagej
        import scyjava
    except ImportError:
        raise DinofeatError(FIJI_EXTRA_HINT) from None
    scyjava.config.set_java_constraints(fetch="never")
    scyjava.config.endpoints.clear()  # imglyb adds a Maven endpoint on import
    if scyjava.jvm_started():
        raise DinofeatError("a Java VM is already running in this process without Fiji; start Fiji first.")
    return imagej.init(str(fiji_dir), mode="headless")


def start_imagej1(jars: tuple[str, ...] = DEBIAN_JARS, jvm_options: tuple[str, ...] = ()) -> None:
    """A JVM with ImageJ1 and JHDF5 on the class path (enough for stacks and HDF5; no TWS).

    `jvm_options` go to the JVM as they are, e.g. ("-Xmx8g",) for large stacks."""
    import jpype
    import jpype.imports  # noqa: F401 (Java packages become importable: from ij import IJ)

    if jpype.isJVMStarted():
        return
    missing = [jar for jar in jars if not os.path.exists(jar)]
    if missing:
        raise DinofeatError(f"{missing[0]} is missing; install Debian's libij-java and libsis-jhdf5-java, or use a Fiji with --fiji.")
    jpype.startJVM(*jvm_options, classpath=list(jars), convertStrings=True)
