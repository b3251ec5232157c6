"""Start the Java side: a local Fiji (through pyimagej, or JPype on its jars; headless, offline), or plain
ImageJ1 + JHDF5 jars.

One JVM per process (JPype cannot restart one), so the first call decides which it is.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dinofeat.contract.errors import DinofeatError

DEBIAN_JARS = ("/usr/share/java/ij.jar", "/usr/share/java/sis-jhdf5.jar")
"""ImageJ1 and JHDF5 as Debian installs them (libij-java, libsis-jhdf5-java)."""


FIJI_EXTRA_HINT = ("the Fiji bridge needs JPype (and pyimagej for Fiji with ImageJ2): install the fiji extra, with "
                   "pip install 'dinofeat[fiji]' for a released dinofeat, or pip install -e '.[fiji]' in a dinofeat checkout "
                   "(inside its .venv).")


FIJI_JVM_OPTIONS = ("-Djava.awt.headless=true", "--add-opens=java.base/java.lang=ALL-UNNAMED")
"""What Fiji's own launcher passes: no display, and the reflection Weka 3.9 needs on Java 17+."""


def fiji_jars(fiji_dir: Path) -> list[str]:
    """The class path of a Fiji.app: every jar in jars/ (and its platform folders) and plugins/."""
    jars = sorted(fiji_dir.glob("jars/*.jar")) + sorted(fiji_dir.glob("jars/*/*.jar")) + sorted(fiji_dir.glob("plugins/*.jar"))
    return [str(jar) for jar in jars]


def bundled_java(fiji_dir: Path) -> str | None:
    """The JVM library of the Java a Fiji.app brings (Fiji.app/java/...), if it has one."""
    for name in ("libjvm.so", "libjvm.dylib", "jvm.dll"):
        found = sorted(fiji_dir.glob(f"java/**/{name}"))
        if found:
            return str(found[0])
    return None


def checked_fiji(fiji_dir: str | Path) -> Path:
    """A Fiji.app folder with Trainable Weka Segmentation, or one sentence naming what is missing."""
    fiji_dir = Path(fiji_dir)
    if not (fiji_dir / "jars").is_dir():
        raise DinofeatError(f"{fiji_dir} is not a Fiji installation (it has no jars/ folder); give the Fiji.app folder with --fiji or FIJI_DIR.")
    if not [*fiji_dir.glob("plugins/Trainable_Segmentation*.jar"), *fiji_dir.glob("jars/Trainable_Segmentation*.jar")]:
        raise DinofeatError(f"{fiji_dir} has no Trainable Weka Segmentation (no plugins/Trainable_Segmentation*.jar); "
                            "install it in Fiji (Help > Update, it is part of Fiji's default sites) and try again.")
    return fiji_dir


def start_fiji(fiji_dir: str | Path):
    """A JVM running a local Fiji.app's Trainable Weka Segmentation, headless and offline.

    A Fiji with ImageJ2 starts through pyimagej when it is installed and can start offline (it returns
    its gateway); otherwise, or when pyimagej fails (pyimagej 1.8.0 cannot start offline), JPype starts
    the JVM on the Fiji.app's jars directly, with its bundled Java when it has one (returns None)."""
    fiji_dir = checked_fiji(fiji_dir)
    try:
        import jpype
        import jpype.config
        import jpype.imports  # noqa: F401 (Java packages become importable: from ij import IJ)
    except ImportError:
        raise DinofeatError(FIJI_EXTRA_HINT) from None
    if jpype.isJVMStarted():
        raise DinofeatError("a Java VM is already running in this process without Fiji; start Fiji first.")
    if list(fiji_dir.glob("jars/imagej-2*.jar")):
        with contextlib.suppress(ImportError):
            import imagej
            import scyjava

            scyjava.config.set_java_constraints(fetch="never")
            scyjava.config.endpoints.clear()  # imglyb adds a Maven endpoint on import
            try:
                return imagej.init(str(fiji_dir), mode="headless")
            except Exception:  # noqa: BLE001 (pyimagej fails in many ways offline; the direct start follows)
                if jpype.isJVMStarted():
                    raise DinofeatError(f"pyimagej could not start {fiji_dir} and left its Java VM running; "
                                        "run the command again with the fiji extra uninstalled, or fix pyimagej's set-up.") from None
    jvm = bundled_java(fiji_dir)
    jpype.config.destroy_jvm = False  # at exit, do not wait for TWS's idle pool threads (60 s): every result is written by then
    jpype.startJVM(*([jvm] if jvm else []), *FIJI_JVM_OPTIONS, classpath=fiji_jars(fiji_dir), convertStrings=True)
    return None


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
